"""The student: TransVG's grounding model (paper sec. 3.1), with TransVG's visual branch or QRNet's (qrnet.py).

    image (B,3,S,S) -> visual branch ------------------------------------------> visual_proj -+
       TransVG: ResNet -> 1x1 conv -> + sine position -> DETR encoder                          +-> [REG | visual | text]
       QRNet:   Swin + QD-ATT -> query-aware neck (reads BERT's [CLS]: qrnet.py)                |   + learned position
    text ids (B,L) --> BERT (last layer, all L tokens) -----------------------> text_proj ----+   -> fusion transformer
                                                                                                 -> MLP on [REG] -> sigmoid
                                                                                                 -> box (cx, cy, w, h) in [0,1]
The student picks its visual branch once, from ModelConfig.backbone; both take (images, img_is_pad, query) and
return (tokens (B,N,D), tokens_is_pad (B,N), the CNN's or Swin's last map (B,C,h,w)); the rest is shared.

References: EpmVG paper, arXiv 2312.17648, sec. 3.1 (eq. 1-4) and Appendix A (distillation locations); TransVG,
github.com/djiajunustc/TransVG @ c862427 (models/trans_vg.py, vl_transformer.py, visual_model/*); DETR,
github.com/facebookresearch/detr (backbone, sine position encoding, post-norm encoder layer).

Shape letters: B batch, S canvas side (ModelConfig.imsize), h x w feature map, N visual tokens (h*w for TransVG),
L text tokens (max_query_len), D fusion width (256), H BERT width (768), C ResNet channels (2048).

Differences from the official code, all numerically neutral (checked against it: tests/test_model.py's parity test):
  - the fusion sequence is in the paper's order [REG, visual, text] (eq. 1); TransVG uses [REG, text, visual].
    Attention is permutation-equivariant once each token carries its own position embedding, so only the rows of
    the learned position table move; interop.transvg_to_ours reorders them.
  - BERT has no pooler: TransVG never uses it, and its unused parameters would force DDP's find_unused_parameters.
  - attention runs through nn.MultiheadAttention with need_weights=False, i.e. F.scaled_dot_product_attention.
Weights: BERT (by name) and torchvision's ImageNet ResNet load here; files of other formats in machinery/interop.py.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.ops import FrozenBatchNorm2d
from transformers import BertConfig, BertModel

import qrnet
from machinery.checkpoints import check_format, read_checkpoint
from machinery.flags import check_fields

# -----------------------------------------------------------------------------
# config


# --visual_init values that are not a file: the two GroundingModel builds itself, and the two names resolved to the
# official checkpoint under --checkpoint_dir (interop.official_visual_checkpoint, when a run starts)
BUILT_IN_VISUAL_INITS = ("random", "imagenet")
OFFICIAL_VISUAL_INITS = ("detr", "mask_rcnn")
NAMED_VISUAL_INITS = (*BUILT_IN_VISUAL_INITS, *OFFICIAL_VISUAL_INITS)
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = RESNETS + tuple(qrnet.SWIN_SIZES)


@dataclass(frozen=True)
class Location:
    visual: str  # the student feature the image term pulls toward CLIP's pooled [DIE]
    text: str  # the one the text term pulls toward the pooled [DTE]
    in_visual_branch: bool  # the visual feature is the visual branch's own: a frozen branch cannot learn from it


# The paper's distillation locations (Appendix A, Table 4). forward() returns each one's features under
# out["distill"][name] and distill_widths() their widths; --distill_loc and --gap_loc take the names. p_v^1, the
# first visual token, is the top-left cell of the visual grid (QRNet: of its stride-32 level), a padding cell when
# the image is letterboxed below or right of it: masked as a key, while as a query it still attends to every valid
# token (the paper's [VLS], read literally from eq. 2).
LOCATIONS = {
    "loc1": Location("fusion output at the first visual token ([VLS], p'_v^1)", "fusion output at [CLS] (p'_l^1)",
                     False),
    "loc2": Location("visual_proj's output there (fusion input)", "text_proj's output at [CLS]", False),
    "loc3": Location("the visual branch's first token (DETR encoder; QRNet: the neck's, + its scale embedding)",
                     "BERT's last layer at [CLS]", True),
    "loc4": Location("the CNN's top-left cell (QRNet: Swin's last stage)", "BERT's embedding layer at [CLS]", True),
}


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
    pos_std: float = 1.0  # init std of the fusion's position table: 1 = TransVG's nn.Embedding (synthetic world: 0.02)
    max_query_len: int = 20  # L: text tokens incl. [CLS] and [SEP] (TransVG: 40 for RefCOCOg)
    text_encoder: str = "bert-base-uncased"  # HF hub name or local directory of a BERT model
    text_init: str = "pretrained"  # "pretrained" (weights of text_encoder) or "random"
    text_config: dict | None = None  # BertConfig fields; filled at build time so a checkpoint rebuilds offline
    visual_init: str = "random"  # random, imagenet (a ResNet's), or a DETR / TransVG / QRNet / Mask R-CNN file

    CHOICES = {"backbone": BACKBONES, "text_init": ("pretrained", "random")}

    def __post_init__(self) -> None:  # refused here, when the flags are read, not after minutes of loading
        swin = (self.swin or qrnet.SWIN_SIZES[self.backbone]) if self.backbone in qrnet.SWIN_SIZES else None
        depths = swin.get("depths", []) if swin else []
        stride = qrnet.deepest_stride(depths) if swin else 16 if self.dilation or self.resnet_stages == 3 else 32
        check_fields(self, [
            ("swin", swin is None or len(depths) in qrnet.STAGES, "Swin sizes whose depths give 4 stages (or 3)"),
            ("visual_init", self.visual_init != "imagenet" or self.backbone in RESNETS, "not imagenet (a ResNet's)"),
            ("dilation", not self.dilation or self.backbone in ("resnet50", "resnet101"), "a bottleneck ResNet"),
            ("resnet_stages", self.resnet_stages == 4 or (self.resnet_stages == 3 and not self.dilation and
                                                          self.backbone in RESNETS), "4, or 3 for an undilated ResNet"),
            ("imsize", self.imsize > 0 and self.imsize % stride == 0, f"a multiple of the stride {stride}"),
            ("nheads", self.nheads >= 1, ">= 1"),
            ("hidden_dim", self.hidden_dim > 0 and self.hidden_dim % self.nheads == 0,
             f"a multiple of nheads = {self.nheads}"),
            ("dim_feedforward", self.dim_feedforward > 0, "> 0"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
            ("pos_std", self.pos_std >= 0, ">= 0"),
            ("enc_layers", self.enc_layers >= 0, ">= 0"), ("vl_layers", self.vl_layers >= 1, ">= 1"),
            ("max_query_len", self.max_query_len >= 2, ">= 2 ([CLS] and [SEP])")])


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
        config = BertConfig(**cfg.text_config) if cfg.text_config else BertConfig.from_pretrained(cfg.text_encoder)
        config._attn_implementation = "sdpa"  # what from_pretrained's attn_implementation argument sets
        return BertModel(config, add_pooling_layer=False)
    except OSError as e:
        raise bert_error(cfg, e) from e


def bert_error(cfg: ModelConfig, e: OSError) -> OSError:
    return OSError(f"could not load the BERT text encoder {cfg.text_encoder!r}: {e}\nGive text_encoder a local "
                   "directory with config.json, model weights and vocab.txt (e.g. a copy of bert-base-uncased) "
                   "or set HF_HOME to a cache that holds it.")


class TransVGVisual(nn.Module):
    """TransVG's visual branch: ResNet -> 1x1 conv to D -> + sine position -> DETR encoder (names as in DETR, whose
    checkpoints initialise it). forward(images (B,3,S,S), img_is_pad (B,S,S) True = padding, query: unused) ->
      tokens (B,N,D), N = (S / stride)^2, row-major; tokens_is_pad (B,N); the CNN's last map (B,C,h,w)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = build_resnet(cfg.backbone, cfg.dilation, cfg.visual_init, cfg.trainable_bn)
        self.stages = ("conv1", "bn1", "relu", "maxpool", *(f"layer{i}" for i in range(1, cfg.resnet_stages + 1)))
        if cfg.resnet_stages == 3:
            del self.backbone.layer4
        self.stride = 16 if cfg.dilation or cfg.resnet_stages == 3 else 32
        last = getattr(self.backbone, self.stages[-1])[-1]
        self.cnn_channels = last.conv1.in_channels  # C: 2048 (bottleneck) or 512 (basic); layer3: half that
        self.input_proj = nn.Conv2d(self.cnn_channels, cfg.hidden_dim, kernel_size=1)
        self.encoder = Encoder(cfg.enc_layers, cfg.hidden_dim, cfg.nheads, cfg.dim_feedforward, cfg.dropout)

    def num_tokens(self, imsize: int) -> int:
        return (imsize // self.stride) ** 2  # 400 for a 640 canvas

    def forward(self, images: torch.Tensor, img_is_pad: torch.Tensor, query: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = images
        for name in self.stages:
            x = getattr(self.backbone, name)(x)
        # A cell is padding iff the pixel at its top-left corner is (nearest resize at an exact stride): TransVG's.
        feat_is_pad = F.interpolate(img_is_pad[:, None].float(), size=x.shape[-2:]).squeeze(1).bool()  # (B,h,w)
        pos = sine_position_embedding(feat_is_pad, self.input_proj.out_channels).to(x.dtype)  # (B,N,D)
        vis_is_pad = feat_is_pad.flatten(1)  # (B,N)
        vis = self.input_proj(x).flatten(2).transpose(1, 2)  # (B,N,D)
        return self.encoder(vis, pos, vis_is_pad), vis_is_pad, x


# -----------------------------------------------------------------------------
# the grounding model


class GroundingModel(nn.Module):
    """out = model(images, img_is_pad, input_ids, attention_mask); see forward for the outputs. Built from its config
    alone (random weights, or BERT's and ImageNet's by name); machinery/interop.load_visual_checkpoint then loads a
    visual_init file (a DETR, TransVG, QRNet or Mask R-CNN checkpoint), when a run starts from one."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_dim
        # the visual branch, chosen once; QRNet's reads BERT's [CLS] and so is built after BERT (of BERT's width).
        # The order of construction fixes which random numbers each part draws: TransVG's branch comes first.
        if cfg.backbone in qrnet.SWIN_SIZES:
            self.text_encoder = build_bert(cfg)
            self.visual = qrnet.QRNetVisual(cfg.swin or qrnet.SWIN_SIZES[cfg.backbone], D,
                                            self.text_encoder.config.hidden_size)
        else:
            self.visual = TransVGVisual(cfg)
            self.text_encoder = build_bert(cfg)  # train.py fills cfg.text_config first, so checkpoints rebuild it
        bert = self.text_encoder.config
        self.num_visual = self.visual.num_tokens(cfg.imsize)  # N
        # fusion: projections to D, [REG], learned positions for [REG | N visual | L text], the transformer
        self.visual_proj = nn.Linear(D, D)
        self.text_proj = nn.Linear(bert.hidden_size, D)
        self.reg_token = nn.Parameter(torch.randn(1, D))  # N(0,1) like TransVG's nn.Embedding
        self.pos_embed = nn.Parameter(cfg.pos_std * torch.randn(1 + self.num_visual + cfg.max_query_len, D))
        self.fusion = Encoder(cfg.vl_layers, D, cfg.nheads, cfg.dim_feedforward, cfg.dropout)
        # prediction module, eq. 4: Linear-ReLU-Linear-ReLU-Linear, then a sigmoid in forward
        self.bbox_head = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D), nn.ReLU(), nn.Linear(D, 4))

    def distill_widths(self, loc: str) -> tuple[int, int]:
        """Widths (Cv, Ct) of the student features at a distillation location (what the teacher is pooled to)."""
        D, H = self.cfg.hidden_dim, self.text_encoder.config.hidden_size
        return {"loc1": (D, D), "loc2": (D, D), "loc3": (D, H), "loc4": (self.visual.cnn_channels, H)}[loc]

    def forward(self, images: torch.Tensor | None, img_is_pad: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, visual: tuple | None = None) -> dict:
        """images (B,3,S,S) normalised canvas; img_is_pad (B,S,S) True = padding; input_ids (B,L);
        attention_mask (B,L) 1 = real token; visual: what self.visual returned for these images, computed earlier
        (a frozen TransVG branch: machinery/cache.py), or None. Returns
          "pred_boxes": (B,4) normalised (cx, cy, w, h) on the canvas;
          "distill": {loc: (visual (B,Cv), text (B,Ct))}, the student features at each of LOCATIONS (Table 4).
        """
        S, S2 = (self.cfg.imsize,) * 2 if visual is not None else images.shape[-2:]
        L = input_ids.shape[1]
        if (S, S2) != (self.cfg.imsize,) * 2 or L != self.cfg.max_query_len:
            raise ValueError(f"model expects {self.cfg.imsize}x{self.cfg.imsize} images and {self.cfg.max_query_len} "
                             f"tokens (ModelConfig.imsize/max_query_len), got {S}x{S2} and {L}")
        # linguistic branch: every token of the last layer, pads masked
        bert = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        txt = bert.last_hidden_state  # (B,L,H)
        # visual branch; its query is BERT's last-layer [CLS] (QRNet's QD-ATT reads it, not detached, so its gradient
        # also trains BERT; TransVG's ignores it)
        vis, vis_is_pad, cnn = self.visual(images, img_is_pad, txt[:, 0]) if visual is None else visual
        boxes, out, p_v, p_l = self.fuse(vis, vis_is_pad, txt, attention_mask == 0)
        cls = 1 + self.num_visual  # index of [CLS] in the joint sequence
        features = {  # (visual, text) at each of LOCATIONS
            "loc1": (out[:, 1], out[:, cls]),
            "loc2": (p_v[:, 0], p_l[:, 0]),
            "loc3": (vis[:, 0], txt[:, 0]),
            "loc4": (cnn[:, :, 0, 0], bert.hidden_states[0][:, 0]),
        }
        return {"pred_boxes": boxes, "distill": features}

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
        check_format(ckpt, path)
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
    return replace(cfg, text_config={k: getattr(bert, k) for k in BERT_FIELDS})


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
