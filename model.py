"""The student: TransVG's grounding model (paper sec. 3.1) or QRNet's, our checkpoints, DETR / ResNet / Swin init.

    image (B,3,S,S) -> ResNet -> 1x1 conv -> + sine position -> DETR encoder ----> visual_proj -+
                                                                                                 +-> [REG | visual | text]
    text ids (B,L) --> BERT (last layer, all L tokens) -----------------------> text_proj ----+   + learned position
                                                                                                 -> fusion transformer
                                                                                                 -> MLP on [REG] -> sigmoid
                                                                                                 -> box (cx, cy, w, h) in [0,1]
QRNet (--backbone swin_s_qrnet; qrnet.py, which also says how it differs from the official code) has instead of
ResNet + DETR encoder a Swin and a neck gated by BERT's last-layer [CLS] (QD-ATT); fusion and head are the same.
References
  EpmVG paper, arXiv 2312.17648, sec. 3.1 (eq. 1-4) and Appendix A (distillation locations).
  TransVG, github.com/djiajunustc/TransVG @ c862427: models/trans_vg.py, vl_transformer.py, visual_model/*.
  DETR, github.com/facebookresearch/detr (backbone, sine position encoding, post-norm encoder layer).

Shape letters: B batch, S canvas side (ModelConfig.imsize), h x w feature map, N = h*w visual tokens,
L text tokens (max_query_len), D fusion width (256), H BERT width (768), C ResNet channels (2048).

Differences from the official code, all numerically neutral (checked against it: interop.py, the README):
  - the fusion sequence is in the paper's order [REG, visual, text] (eq. 1); TransVG uses [REG, text, visual].
    Attention is permutation-equivariant once each token carries its own position embedding, so only the rows of
    the learned position table move; interop.transvg_to_ours reorders them.
  - BERT has no pooler: TransVG never uses it, and its unused parameters would force DDP's find_unused_parameters.
  - attention runs through nn.MultiheadAttention with need_weights=False, i.e. F.scaled_dot_product_attention.
"""

import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import FrozenBatchNorm2d
from transformers import BertConfig, BertModel

import qrnet
from runtime import UsageError

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    backbone: str = "resnet50"  # TransVG: resnet18/34/50/101 (paper: 50, 101); QRNet: swin_s_qrnet, swin_toy_qrnet
    swin: dict | None = None  # QRNet's Swin sizes (as in qrnet.SWIN_SIZES); None = those its backbone name gives
    dilation: bool = False  # dilate layer4 (stride 16 instead of 32): 4x the visual tokens
    resnet_stages: int = 4  # 3 drops layer4 (stride 16, C = layer3's): the synthetic world's small canvases
    trainable_bn: bool = False  # False: TransVG's frozen BN, stem and layer1 (pretrained weights); True: all train
    imsize: int = 640  # side of the square padded canvas the model is built for
    hidden_dim: int = 256  # D: width of the DETR encoder and of the fusion transformer
    nheads: int = 8  # attention heads in both transformers
    dim_feedforward: int = 2048  # FFN width in both transformers
    dropout: float = 0.1  # dropout in both transformers (attention weights, FFN, residuals)
    enc_layers: int = 6  # DETR (visual) encoder layers
    vl_layers: int = 6  # fusion (visual-linguistic) transformer layers
    pos_std: float = 1.0  # init std of the fusion's position table: 1 = TransVG's nn.Embedding (README: 0.02 on toy tokens)
    max_query_len: int = 20  # L: text tokens incl. [CLS] and [SEP] (TransVG: 40 for RefCOCOg)
    text_encoder: str = "bert-base-uncased"  # HF hub name or local directory of a BERT model
    text_init: str = "pretrained"  # "pretrained" (weights of text_encoder) or "random"
    text_config: dict | None = None  # BertConfig fields; filled at build time so a checkpoint rebuilds offline
    visual_init: str = "random"  # "random", "imagenet" (a ResNet's), or a DETR / ResNet / Mask R-CNN Swin-S path

    def __post_init__(self) -> None:  # refused here, when the flags are read, not after minutes of loading
        stride = 16 if self.dilation or self.resnet_stages == 3 else 32
        for name, ok, expected in [
                ("backbone", self.backbone in BACKBONES, f"one of {', '.join(BACKBONES)}"),
                ("visual_init", self.visual_init != "imagenet" or self.backbone in RESNETS, "not imagenet (a ResNet's)"),
                ("dilation", not self.dilation or self.backbone in ("resnet50", "resnet101"), "a bottleneck ResNet"),
                ("resnet_stages", self.resnet_stages == 4 or (self.resnet_stages == 3 and not self.dilation
                                                              and self.backbone in RESNETS), "4, or 3 for an undilated ResNet"),
                ("imsize", self.imsize > 0 and self.imsize % stride == 0, f"a multiple of the stride {stride}"),
                ("nheads", self.nheads >= 1, ">= 1"),
                ("hidden_dim", self.hidden_dim > 0 and self.hidden_dim % self.nheads == 0,
                 f"a multiple of nheads = {self.nheads}"),
                ("dim_feedforward", self.dim_feedforward > 0, "> 0"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                ("pos_std", self.pos_std >= 0, ">= 0"),
                ("enc_layers", self.enc_layers >= 0, ">= 0"), ("vl_layers", self.vl_layers >= 1, ">= 1"),
                ("max_query_len", self.max_query_len >= 2, ">= 2 ([CLS] and [SEP])"),
                ("text_init", self.text_init in ("pretrained", "random"), "pretrained or random")]:
            if not ok:
                raise UsageError(f"--{name}: expected {expected}, got {getattr(self, name)!r}")


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = RESNETS + tuple(qrnet.SWIN_SIZES)
# BertConfig fields that fully determine the architecture (and hence the parameter shapes).
BERT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
               "hidden_dropout_prob", "attention_probs_dropout_prob", "pad_token_id")

# -----------------------------------------------------------------------------
# building blocks


def sine_position_embedding(feat_is_pad: torch.Tensor, dim: int) -> torch.Tensor:
    """DETR's 2-D sine position encoding (normalize=True), (B,h,w) bool -> (B,h*w,dim).

    Coordinates are cumulative counts of valid cells, divided by the valid extent: a padded image gets the same
    encoding over its valid region as the same image without padding. Channels: [y-part | x-part], each
    interleaving sin (even) and cos (odd) over dim/2 frequencies with temperature 10000.
    """
    not_pad = ~feat_is_pad
    y = not_pad.cumsum(1, dtype=torch.float32)  # (B,h,w), 1-based row index inside the valid region
    x = not_pad.cumsum(2, dtype=torch.float32)
    y = y / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = x / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    half = dim // 2
    freq = 10000 ** (2 * (torch.arange(half, device=x.device) // 2) / half)  # (dim/2,)
    pos = []
    for coord in (y, x):
        angle = coord[..., None] / freq  # (B,h,w,dim/2)
        pos.append(torch.stack((angle[..., 0::2].sin(), angle[..., 1::2].cos()), dim=4).flatten(3))
    return torch.cat(pos, dim=3).flatten(1, 2)  # (B,h*w,dim)


class EncoderLayer(nn.Module):
    """Post-norm transformer encoder layer of DETR and TransVG: positions go into queries and keys at every layer.

    Parameter names match TransVG's (self_attn.in_proj_weight, linear1, linear2, norm1, norm2).
    """

    def __init__(self, dim: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nheads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_is_pad: torch.Tensor) -> torch.Tensor:
        # x, pos: (B,T,D); key_is_pad: (B,T) True = ignore as a key. need_weights=False takes the SDPA path.
        q = k = x + pos
        attn = self.self_attn(q, k, x, key_padding_mask=key_is_pad, need_weights=False)[0]
        x = self.norm1(x + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout(ffn))


class Encoder(nn.Module):
    def __init__(self, num_layers: int, dim: int, nheads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(dim, nheads, dim_feedforward, dropout) for _ in range(num_layers))
        for p in self.parameters():  # TransVG/DETR: xavier on every matrix, PyTorch defaults for biases
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, key_is_pad: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos, key_is_pad)
        return x  # post-norm layers: no final LayerNorm


def build_resnet(name: str, dilation: bool, init: str, trainable_bn: bool = False) -> nn.Module:
    """A torchvision ResNet without fc/avgpool. As in DETR's BackboneBase, BN is frozen and so are the stem and
    layer1: right for pretrained weights. trainable_bn keeps ordinary BatchNorm and trains every layer instead,
    for a backbone learned from scratch (random frozen BN statistics leave activations unnormalised and the
    training slow and unstable; the synthetic world's preset uses it)."""
    if name not in ("resnet18", "resnet34", "resnet50", "resnet101"):
        raise ValueError(f"backbone must be resnet18/34/50/101, got {name!r}")
    if dilation and name in ("resnet18", "resnet34"):
        raise ValueError(f"dilation needs a bottleneck ResNet (resnet50/101), got {name!r}")
    kwargs = {"replace_stride_with_dilation": [False, False, True]} if dilation else {}
    weights = "IMAGENET1K_V1" if init == "imagenet" else None
    try:
        norm = nn.BatchNorm2d if trainable_bn else FrozenBatchNorm2d
        net = getattr(torchvision.models, name)(weights=weights, norm_layer=norm, **kwargs)
    except (OSError, RuntimeError) as e:  # urllib errors are OSErrors
        raise RuntimeError(f"could not get torchvision's ImageNet weights for {name} ({e}); offline, pass "
                           f"visual_init=<path to a DETR checkpoint or a torchvision {name} state dict>") from e
    del net.fc, net.avgpool
    for pname, p in net.named_parameters():
        if not trainable_bn and not pname.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)  # conv1 and layer1 stay at their pre-trained values
    return net


def build_bert(cfg: ModelConfig) -> BertModel:
    """BERT without its pooler, from pretrained weights or from a config (random init)."""
    try:
        if cfg.text_init == "pretrained":
            return BertModel.from_pretrained(cfg.text_encoder, add_pooling_layer=False, attn_implementation="sdpa")
        if cfg.text_init != "random":
            raise ValueError(f"text_init must be 'pretrained' or 'random', got {cfg.text_init!r}")
        config = BertConfig(**cfg.text_config) if cfg.text_config else BertConfig.from_pretrained(cfg.text_encoder)
        config._attn_implementation = "sdpa"  # what from_pretrained's attn_implementation argument sets
        return BertModel(config, add_pooling_layer=False)
    except OSError as e:
        raise bert_error(cfg, e) from e


def bert_error(cfg: ModelConfig, e: OSError) -> OSError:
    return OSError(f"could not load the BERT text encoder {cfg.text_encoder!r}: {e}\nGive text_encoder a local "
                   "directory with config.json, model weights and vocab.txt (e.g. a copy of bert-base-uncased) "
                   "or set HF_HOME to a cache that holds it.")


# -----------------------------------------------------------------------------
# the grounding model


class GroundingModel(nn.Module):
    """TransVG: out = model(images, img_is_pad, input_ids, attention_mask); see forward for the outputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_dim
        self.stride = 16 if cfg.dilation or cfg.resnet_stages == 3 else 32
        n, self.qrnet = cfg.imsize // self.stride, cfg.backbone in qrnet.SWIN_SIZES
        self.num_visual = n * n + ((n + 1) // 2) ** 2 * self.qrnet  # N: 400 for a 640 canvas (QRNet: + 100)
        if not self.qrnet:  # visual branch: ResNet -> 1x1 conv -> DETR encoder (names as in DETR: its checkpoints map)
            self.backbone = build_resnet(cfg.backbone, cfg.dilation, "imagenet" if cfg.visual_init == "imagenet"
                                         else "", cfg.trainable_bn)
            self.stages = ("conv1", "bn1", "relu", "maxpool", *(f"layer{i}" for i in range(1, cfg.resnet_stages + 1)))
            if cfg.resnet_stages == 3:
                del self.backbone.layer4
            last = getattr(self.backbone, self.stages[-1])[-1]
            self.cnn_channels = last.conv1.in_channels  # C: 2048 (bottleneck) or 512 (basic); layer3: half that
            self.input_proj = nn.Conv2d(self.cnn_channels, D, kernel_size=1)
            self.visual_encoder = Encoder(cfg.enc_layers, D, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        # linguistic branch (train.py fills cfg.text_config first, resolve_text_config, so checkpoints rebuild it)
        self.text_encoder = build_bert(cfg)
        bert = self.text_encoder.config
        if self.qrnet:  # after BERT: its visual branch is conditioned on BERT's [CLS], of BERT's width
            self.backbone = qrnet.QRNetVisual(cfg.swin or qrnet.SWIN_SIZES[cfg.backbone], D, bert.hidden_size)
            self.cnn_channels = self.backbone.widths[-1]  # C: Swin's last stage
        check_text_length(cfg, bert.max_position_embeddings)
        # fusion: projections to D, [REG], learned positions for [REG | N visual | L text], the transformer
        self.visual_proj = nn.Linear(D, D)
        self.text_proj = nn.Linear(bert.hidden_size, D)
        self.reg_token = nn.Parameter(torch.randn(1, D))  # N(0,1) like TransVG's nn.Embedding
        self.pos_embed = nn.Parameter(cfg.pos_std * torch.randn(1 + self.num_visual + cfg.max_query_len, D))
        self.fusion = Encoder(cfg.vl_layers, D, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        # prediction module, eq. 4: Linear-ReLU-Linear-ReLU-Linear, then a sigmoid in forward
        self.bbox_head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 4))
        if cfg.visual_init not in ("random", "imagenet"):
            load_visual_checkpoint(self, cfg.visual_init)

    def distill_widths(self, loc: str) -> tuple[int, int]:
        """Widths (Cv, Ct) of the student features at a distillation location (what the teacher is pooled to)."""
        D, H = self.cfg.hidden_dim, self.text_encoder.config.hidden_size
        widths = {"loc1": (D, D), "loc2": (D, D), "loc3": (D, H), "loc4": (self.cnn_channels, H)}
        if loc not in widths:
            raise ValueError(f"distillation location must be one of {sorted(widths)}, got {loc!r}")
        return widths[loc]

    def forward(self, images: torch.Tensor | None, img_is_pad: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, visual: tuple | None = None) -> dict:
        """images (B,3,S,S) normalised canvas; img_is_pad (B,S,S) True = padding; input_ids (B,L);
        attention_mask (B,L) 1 = real token; visual: what encode_image returned for these images, computed earlier
        (a frozen visual branch: train.py's --cache_visual), or None. Returns
          "pred_boxes": (B,4) normalised (cx, cy, w, h) on the canvas;
          "distill": {loc: (visual (B,Cv), text (B,Ct))}, the student features of the paper's Table 4:
             loc1 fusion outputs at the first visual token ([VLS], p'_v^1) and at [CLS] (p'_l^1): the default;
             loc2 the same two tokens right after visual_proj / text_proj (fusion inputs);
             loc3 DETR encoder output (first token) and BERT's last layer at [CLS];
             loc4 ResNet output (first cell, top-left) and BERT's embedding-layer output at [CLS].
          QRNet, which has neither: loc3 the neck's first token (stride 32, with its scale embedding), loc4 Swin's.
        """
        if visual is not None and self.qrnet:
            raise ValueError("QRNet's visual branch reads the expression: it has no precomputed `visual`")
        S, S2 = (self.cfg.imsize,) * 2 if visual is not None else images.shape[-2:]
        L = input_ids.shape[1]
        if (S, S2) != (self.cfg.imsize,) * 2 or L != self.cfg.max_query_len:
            raise ValueError(f"model expects {self.cfg.imsize}x{self.cfg.imsize} images and {self.cfg.max_query_len} "
                             f"tokens (ModelConfig.imsize/max_query_len), got {S}x{S2} and {L}")
        text = {"input_ids": input_ids, "attention_mask": attention_mask, "output_hidden_states": True}
        if self.qrnet:  # BERT first: its last-layer [CLS] is the query (not detached: QD-ATT's gradient trains BERT)
            bert = self.text_encoder(**text)
            vis, vis_is_pad, cnn = self.backbone(images, img_is_pad, bert.last_hidden_state[:, 0])  # (B,N,D), ...
        else:
            vis, vis_is_pad, cnn = self.encode_image(images, img_is_pad) if visual is None else visual
            bert = self.text_encoder(**text)  # linguistic branch: every token of the last layer, pads masked
        txt = bert.last_hidden_state  # (B,L,H)
        boxes, out, p_v, p_l = self.fuse(vis, vis_is_pad, txt, attention_mask == 0)
        cls = 1 + self.num_visual  # index of [CLS] in the joint sequence
        return {
            "pred_boxes": boxes,
            "distill": {
                "loc1": (out[:, 1], out[:, cls]),
                "loc2": (p_v[:, 0], p_l[:, 0]),
                "loc3": (vis[:, 0], txt[:, 0]),
                "loc4": (cnn[:, :, 0, 0], bert.hidden_states[0][:, 0]),
            },
        }

    def encode_image(self, images: torch.Tensor, img_is_pad: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """TransVG's visual branch (ResNet -> 1x1 conv -> DETR encoder): vis (B,N,D), vis_is_pad (B,N), cnn (B,C,h,w)."""
        x = images
        for name in self.stages:
            x = getattr(self.backbone, name)(x)
        # A cell is padding iff the pixel at its top-left corner is (nearest resize at an exact stride): TransVG's.
        feat_is_pad = F.interpolate(img_is_pad[:, None].float(), size=x.shape[-2:]).squeeze(1).bool()  # (B,h,w)
        pos = sine_position_embedding(feat_is_pad, self.cfg.hidden_dim).to(x.dtype)  # (B,N,D)
        vis_is_pad = feat_is_pad.flatten(1)  # (B,N)
        vis = self.input_proj(x).flatten(2).transpose(1, 2)  # (B,N,D)
        return self.visual_encoder(vis, pos, vis_is_pad), vis_is_pad, x

    def fuse(self, vis: torch.Tensor, vis_is_pad: torch.Tensor, txt: torch.Tensor, txt_is_pad: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eq. 1-4: vis (B,N,D) and txt (B,L,H) with their pad masks -> the box (B,4) normalised cxcywh, the fusion
        output (B,1+N+L,D) and the projected inputs p_v (B,N,D), p_l (B,L,D)."""
        B = vis.shape[0]
        p_v, p_l = self.visual_proj(vis), self.text_proj(txt)  # (B,N,D), (B,L,D)
        seq = torch.cat([self.reg_token.expand(B, 1, -1).to(p_v.dtype), p_v, p_l], dim=1)  # X = [p_r, p_v, p_l]
        seq_is_pad = torch.cat([vis_is_pad.new_zeros(B, 1), vis_is_pad, txt_is_pad], dim=1)  # (B,1+N+L)
        out = self.fusion(seq, self.pos_embed[None].to(seq.dtype), seq_is_pad)  # (B,1+N+L,D)
        # the box head in fp32 even under bf16 autocast: bf16 would round a coordinate to ~2 px of a 640 canvas
        with torch.autocast(vis.device.type, enabled=False):
            boxes = self.bbox_head(out[:, 0].float()).sigmoid()  # (B,4)
        return boxes, out, p_v, p_l

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str | torch.device = "cpu", ckpt: dict | None = None
                        ) -> "GroundingModel":
        """The model one of our checkpoints (train.py) holds, built with no network access, in eval mode.
        ckpt: the file's contents if the caller has already read them with read_checkpoint (no second read).
        Official TransVG / QRNet checkpoints: interop.load_model."""
        ckpt = read_checkpoint(path) if ckpt is None else ckpt
        if "model_config" not in ckpt:
            raise ValueError(f"{path}: not a checkpoint of train.py (no 'model_config'); interop.load_model also "
                             f"reads the official TransVG and QRNet ones")
        model = cls(ModelConfig(**{**ckpt["model_config"], "text_init": "random", "visual_init": "random"}))
        model.load_state_dict(ckpt["model"])
        return model.to(map_location).eval()


def resolve_text_config(cfg: ModelConfig, vocab_size: int | None = None) -> ModelConfig:
    """cfg with text_config holding every BertConfig field that fixes BERT's shapes (BERT_FIELDS), so that a
    checkpoint rebuilds its BERT offline. A pretrained BERT's come from text_encoder's config.json; a random
    one's from the fields given, vocab_size (when they do not say) and BertConfig's defaults."""
    try:
        if cfg.text_init == "random" and cfg.text_config is not None:
            bert = BertConfig(**{"vocab_size": vocab_size, **cfg.text_config} if vocab_size else cfg.text_config)
        else:
            bert = BertConfig.from_pretrained(cfg.text_encoder)
    except OSError as e:
        raise bert_error(cfg, e) from e
    check_text_length(cfg, bert.max_position_embeddings)
    return replace(cfg, text_config={k: getattr(bert, k) for k in BERT_FIELDS})


def check_text_length(cfg: ModelConfig, positions: int) -> None:
    """max_query_len tokens must fit BERT's position table (512 for bert-base): refused before anything runs."""
    if cfg.max_query_len > positions:
        raise UsageError(f"--max_query_len {cfg.max_query_len} is more than the text encoder {cfg.text_encoder!r} "
                         f"holds: its position table has {positions} rows")


def example_inputs(cfg: ModelConfig, batch_size: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs in forward's format, for tests and benchmarks: images (B,3,S,S) like a normalised canvas,
    sample i % 3 == 1 with its right half padded and i % 3 == 2 its bottom quarter, token ids below the
    vocabulary size, and sample 0 with 4 real tokens, the rest padding."""
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.imsize, cfg.max_query_len
    vocab = (cfg.text_config or {}).get("vocab_size") or BertConfig().vocab_size
    img_is_pad = torch.zeros(batch_size, S, S, dtype=torch.bool)
    img_is_pad[1::3, :, S // 2:] = True
    img_is_pad[2::3, S * 3 // 4:, :] = True
    attention_mask = torch.ones(batch_size, L, dtype=torch.long)
    attention_mask[0, 4:] = 0
    input_ids = torch.randint(5, vocab, (batch_size, L), generator=g) * attention_mask  # [PAD] = 0
    return {"images": torch.randn(batch_size, 3, S, S, generator=g), "img_is_pad": img_is_pad,
            "input_ids": input_ids, "attention_mask": attention_mask}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Total and trainable parameter counts (FrozenBatchNorm statistics are buffers, not parameters)."""
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


# -----------------------------------------------------------------------------
# checkpoints: reading safely, renaming keys, DETR and ResNet initialisation


def read_checkpoint(path: str, flag: str = "") -> dict:
    """torch.load with weights_only=True; argparse.Namespace (pickled by DETR/TransVG) is the one class allowed.
    A file that is missing, not a checkpoint, or holds other Python objects is a UsageError naming it (after
    `flag`, the option that gave it, e.g. "--resume"): one line, without torch's advice to unpickle it anyway."""
    what = f"{flag} {path}" if flag else path
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no such checkpoint file" if not os.path.isdir(path) else
                         f"{what} is a folder; give the checkpoint file in it (e.g. {os.path.join(path, 'last.pt')})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text: a paragraph on weights_only, then "WeightsUnpickler error: "
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise UsageError(f"{what}: holds a Python object of class {found[1]}, not only tensors and plain data; it is "
                         f"never unpickled (that could run any code)" if found else
                         f"{what}: not a PyTorch checkpoint (torch.load cannot read it)") from None
    except Exception as e:  # zip errors, or whatever torch's unpickler trips on in bytes that are no pickle
        damaged = "zip archive" in str(e)  # torch.save's format is a zip: a truncated or partly copied file
        raise UsageError(f"{what}: not a PyTorch checkpoint (torch.load cannot read it)" if not damaged else
                         f"{what}: a damaged PyTorch checkpoint (torch.load cannot read its zip archive: truncated, or "
                         f"partly copied?)") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"{what}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def rename_keys(sd: dict, prefixes: dict[str, str]) -> tuple[dict, list[str]]:
    """Rename each key of a state dict by the first prefix of `prefixes` ({old: new}) it starts with.
    Returns (renamed state dict, the keys no prefix matched)."""
    renamed, unmatched = {}, []
    for k, v in sd.items():
        old = next((p for p in prefixes if k.startswith(p)), None)
        if old is None:
            unmatched.append(k)
        else:
            renamed[prefixes[old] + k[len(old):]] = v
    return renamed, unmatched


# DETR's names -> ours: the ResNet body, the 1x1 projection and the encoder; its decoder, queries and heads have
# no counterpart. A torchvision ResNet's names -> ours: all but its classifier (fc.*).
DETR_PREFIXES = {"backbone.0.body.": "backbone.", "input_proj.": "input_proj.",
                 "transformer.encoder.layers.": "visual_encoder.layers."}
RESNET_PREFIXES = {"conv1.": "backbone.conv1.", "bn1.": "backbone.bn1.", "layer": "backbone.layer"}


def load_visual_checkpoint(model: GroundingModel, path: str) -> dict[str, list[str]]:
    """Initialise the visual branch from a DETR checkpoint ({'model': {backbone.0.body.*, input_proj.*,
    transformer.encoder.*, ...}}), the visual branch of a TransVG checkpoint (visumodel.*), or a torchvision ResNet
    state dict (conv1.weight, layer1.*, ...); QRNet's from a trained QRNet's or an mmdet Mask R-CNN Swin-S (Swin and
    lateral convs of {'state_dict': {backbone.*, neck.*, rpn_head.*, roi_head.*}}; QD-ATT keeps its init).
    Returns {"loaded": [...], "ignored": [...]} and prints a summary; raises if the file does not fit the model."""
    ckpt = read_checkpoint(path)
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))  # DETR's, TransVG's and QRNet's 'model', mmdet's 'state_dict'
    swin = next((p for p in ("", "visumodel.") if f"{p}backbone.patch_embed.proj.weight" in sd), None)  # mmdet names
    if swin is not None:
        prefixes, expected = None, ("backbone.",)
    elif any(k.startswith("backbone.0.body.") for k in sd):
        prefixes, expected = DETR_PREFIXES, ("backbone.", "input_proj.", "visual_encoder.")
    elif any(k.startswith("visumodel.backbone.0.body.") for k in sd):  # a trained TransVG: its DETR-shaped branch
        prefixes = {"visumodel." + k: v for k, v in DETR_PREFIXES.items()}
        expected = ("backbone.", "input_proj.", "visual_encoder.")
    elif "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        prefixes, expected = RESNET_PREFIXES, ("backbone.",)
    else:
        raise ValueError(f"{path}: expected a DETR checkpoint (keys backbone.0.body.*, input_proj.*, "
                         f"transformer.encoder.*), a torchvision ResNet state dict (conv1.weight, layer1.*) or an "
                         f"mmdet Swin (backbone.patch_embed.*, backbone.layers.*); found keys like {sorted(sd)[:5]}")
    counters = [k for k in sd if k.endswith("num_batches_tracked")]  # BatchNorm's step counter, not a weight
    sd = {k: v for k, v in sd.items() if k not in counters}
    mapped, ignored = (rename_keys(sd, prefixes) if prefixes else
                       qrnet.official_to_ours(sd, swin + "backbone.", swin + "neck.", into="backbone."))
    ignored += counters
    qdatt = any(".qdatt." in k for k in mapped)  # a detector has none: QRNet's QD-ATT keeps its initialisation then
    own = {k: v for k, v in model.state_dict().items() if k.startswith(expected) and not k.endswith(
           ("num_batches_tracked", "scale_embed")) and (qdatt or ".qdatt." not in k)}
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit backbone={model.cfg.backbone} enc_layers={model.cfg.enc_layers}: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    model.load_state_dict(mapped, strict=False)
    print(f"visual branch: loaded {len(mapped)} tensors from {path}; ignored {len(ignored)} "
          f"({', '.join(sorted({'.'.join(k.split('.')[:2]) for k in ignored}))})")
    return {"loaded": sorted(mapped), "ignored": sorted(ignored)}
