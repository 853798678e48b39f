"""Every checkpoint format that is not ours, read into a GroundingModel: official TransVG and QRNet models, DETR,
an mmdet Mask R-CNN Swin-S, a torchvision ResNet.

    model = interop.load_model("TransVG_unc.pth")      # or QRNet's, or one of ours: the same call, a GroundingModel
    interop.load_visual_checkpoint(model, "detr-r50-unc.pth")    # a new student's visual branch from a detector

An official checkpoint ({'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'val_accu'}, written by TransVG's or
QRNet's train.py with a pickled argparse.Namespace, which read_checkpoint allows and nothing else) is mapped key by
key onto ours and loaded strictly, the architecture read off its weights. A detector's checkpoint (DETR, Mask R-CNN)
initialises the student's visual branch only. Parity with the official code (same pred_boxes, fusion outputs and, for
QRNet, neck outputs on the same inputs): the parity tests in tests/test_model.py and tests/test_qrnet.py, docs/.
References: TransVG @ c862427 (models/trans_vg.py, train.py); QRNet @ 6aaa23c (models/trans_vg.py TransVGSwin,
train.py, its mmdet Swin and neck); DETR (its checkpoints' names).
"""

import math
import os
import re

import torch

import qrnet
from machinery.checkpoints import read_checkpoint
from machinery.flags import UsageError
from model import GroundingModel, ModelConfig

# -----------------------------------------------------------------------------
# any checkpoint -> a GroundingModel


def checkpoint_kind(ckpt: dict) -> str:
    """What a checkpoint file holds: "ours" (train.py), "qrnet" or "transvg" (their official train.py's {'model':
    ...}), "detr" (a DETR's state dict), or "other"."""
    if "model_config" in ckpt:
        return "ours"
    sd = ckpt.get("model")
    if isinstance(sd, dict) and "vl_pos_embed.weight" in sd:
        return "qrnet" if "scale_embed.weight" in sd else "transvg"  # QRNet's TransVGSwin has scale embeddings
    return "detr" if any(k.startswith("backbone.0.body.") for k in (sd if isinstance(sd, dict) else ckpt)) else "other"


def load_model(path: str, map_location: str | torch.device = "cpu", ckpt: dict | None = None) -> GroundingModel:
    """The model any checkpoint we read holds, built with no network access, in eval mode: ours (train.py) or an
    official TransVG or QRNet one. ckpt: the file's contents if the caller has already read them (read_checkpoint)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    kind = checkpoint_kind(ckpt)
    if kind == "ours":
        return GroundingModel.from_checkpoint(path, map_location, ckpt)
    if kind not in ("qrnet", "transvg"):
        raise UsageError(f"{path}: neither our checkpoint (no 'model_config') nor TransVG's or QRNet's (no 'model' "
                         f"dict with vl_pos_embed.weight)")
    sd, is_qrnet = ckpt["model"], kind == "qrnet"
    try:
        cfg = (qrnet_config if is_qrnet else transvg_config)(sd, ckpt.get("args") or {})
        model = GroundingModel(cfg)
        model.load_state_dict((qrnet_to_ours if is_qrnet else transvg_to_ours)(sd, cfg.max_query_len))
    except (KeyError, ValueError, RuntimeError) as e:  # a checkpoint that does not fit: say which file
        raise type(e)(f"{path}: {e}") from e
    return model.to(map_location).eval()


def official_visual_checkpoint(visual_init: str, backbone: str, detr: str, checkpoint_dir: str) -> str:
    """Where the paper's visual initialisation lives: TransVG's DETR (visual_init='detr') or QRNet's Mask R-CNN
    Swin-S ('mask_rcnn') for the data set whose detector is `detr`, under checkpoint_dir; a UsageError saying where to
    get it if missing."""
    if visual_init == "detr":
        depth = "r101" if backbone == "resnet101" else "r50"
        path = os.path.join(checkpoint_dir, f"detr-{depth}-{detr}.pth")
        what = "TransVG's DETR checkpoints (COCO without the grounding val/test images; links in TransVG's README)"
    else:  # QRNet's: COCO without the RefCOCO val/test images (its script's unc_latest.pth), or Swin's own release
        path = os.path.join(checkpoint_dir, "mask_rcnn_swin_small_patch4_window7.pth" if detr == "referit"
                            else f"{detr}_latest.pth")
        what = ("a Mask R-CNN Swin-S (RefCOCO family: QRNet's, on the Google Drive its README links; ReferIt and "
                "Flickr: Swin-Transformer-Object-Detection's release)")
    if not os.path.isfile(path):
        raise UsageError(f"{path} not found: the paper initialises the visual branch from {what}. Put it "
                                f"there, point --checkpoint_dir at it, or pass --visual_init "
                                f"{'imagenet|' * (visual_init == 'detr')}random|<path>.")
    return path


# -----------------------------------------------------------------------------
# a detector's checkpoint -> the visual branch

# DETR's names -> the TransVG branch's (model.visual): the ResNet body, the 1x1 projection and the encoder; its
# decoder, queries and heads have no counterpart. A torchvision ResNet's names -> ours: all but its classifier (fc.*).
DETR_PREFIXES = {"backbone.0.body.": "backbone.", "input_proj.": "input_proj.",
                 "transformer.encoder.layers.": "encoder.layers."}
RESNET_PREFIXES = {"conv1.": "backbone.conv1.", "bn1.": "backbone.bn1.", "layer": "backbone.layer"}


def load_visual_checkpoint(model: GroundingModel, path: str) -> dict[str, list[str]]:
    """Initialise model.visual from a DETR checkpoint ({'model': {backbone.0.body.*, input_proj.*,
    transformer.encoder.*, ...}}), the visual branch of a TransVG checkpoint (visumodel.*), or a torchvision ResNet
    state dict (conv1.weight, layer1.*, ...); QRNet's from a trained QRNet's or an mmdet Mask R-CNN Swin-S (Swin and
    lateral convs of {'state_dict': {backbone.*, neck.*, rpn_head.*, roi_head.*}}; QD-ATT keeps its init).
    Returns {"loaded": [...], "ignored": [...]} and prints a summary; raises if the file does not fit the model."""
    ckpt = read_checkpoint(path)
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt))  # DETR's, TransVG's and QRNet's 'model', mmdet's 'state_dict'
    swin = next((p for p in ("", "visumodel.") if f"{p}backbone.patch_embed.proj.weight" in sd), None)  # mmdet names
    if swin is not None:
        prefixes, expected = None, ""
    elif any(k.startswith("backbone.0.body.") for k in sd):
        prefixes, expected = DETR_PREFIXES, ""
    elif any(k.startswith("visumodel.backbone.0.body.") for k in sd):  # a trained TransVG: its DETR-shaped branch
        prefixes, expected = {"visumodel." + k: v for k, v in DETR_PREFIXES.items()}, ""
    elif "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        prefixes, expected = RESNET_PREFIXES, "backbone."
    else:
        raise ValueError(f"{path}: expected a DETR checkpoint (keys backbone.0.body.*, input_proj.*, "
                         f"transformer.encoder.*), a torchvision ResNet state dict (conv1.weight, layer1.*) or an "
                         f"mmdet Swin (backbone.patch_embed.*, backbone.layers.*); found keys like {sorted(sd)[:5]}")
    counters = [k for k in sd if k.endswith("num_batches_tracked")]  # BatchNorm's step counter, not a weight
    sd = {k: v for k, v in sd.items() if k not in counters}
    mapped, ignored = (rename_keys(sd, prefixes) if prefixes else
                       official_to_ours(sd, swin + "backbone.", swin + "neck."))
    ignored += counters
    qdatt = any(".qdatt." in "." + k for k in mapped)  # a detector has none: QRNet's QD-ATT keeps its init then
    own = {k: v for k, v in model.visual.state_dict().items() if k.startswith(expected) and not k.endswith(
           ("num_batches_tracked", "scale_embed")) and (qdatt or ".qdatt." not in "." + k)}
    missing = sorted(set(own) - set(mapped))
    unexpected = sorted(set(mapped) - set(own))
    wrong = sorted(k for k in set(own) & set(mapped) if own[k].shape != mapped[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit backbone={model.cfg.backbone} enc_layers={model.cfg.enc_layers}: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong[:4]}")
    model.visual.load_state_dict(mapped, strict=False)
    kept = "; QD-ATT and the scale embeddings keep their initialisation (a detector has none)" if swin is not None \
        and not qdatt else ""
    print(f"visual branch: loaded {len(mapped)} tensors from {path}; ignored {len(ignored)}" +
          (f" ({', '.join(sorted({'.'.join(k.split('.')[:2]) for k in ignored}))})" if ignored else "") + kept)
    return {"loaded": sorted(mapped), "ignored": sorted(ignored)}


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


# -----------------------------------------------------------------------------
# TransVG: its keys, and the architecture read off its weights

# TransVG key prefix -> ours. textmodel.bert.pooler.* has no counterpart (we drop the unused pooler). QRNet shares
# every prefix after the visual branch's (its visumodel.* go through official_to_ours).
TRANSVG_PREFIXES = {
    "visumodel.backbone.0.body.": "visual.backbone.", "visumodel.input_proj.": "visual.input_proj.",
    "visumodel.transformer.encoder.layers.": "visual.encoder.layers.", "textmodel.bert.": "text_encoder.",
    "vl_pos_embed.weight": "pos_embed", "reg_token.weight": "reg_token", "visu_proj.": "visual_proj.",
    "text_proj.": "text_proj.", "vl_transformer.encoder.layers.": "fusion.layers.",
    **{f"bbox_embed.layers.{i}.": f"bbox_head.{2 * i}." for i in range(3)}}


def transvg_to_ours(sd: dict, max_query_len: int) -> dict:
    """Map an official TransVG state dict to ours: rename keys, drop BERT's pooler, and reorder the position rows
    from TransVG's [REG, L text, N visual] to the paper's [REG, N visual, L text]. BERT's position_ids buffer, which
    transformers 4 saved and 5 recomputes, is dropped too (QRNet's checkpoints hold it)."""
    unused = ("textmodel.bert.pooler.", "textmodel.bert.embeddings.position_ids")
    sd, unmatched = rename_keys({k: v for k, v in sd.items() if not k.startswith(unused)}, TRANSVG_PREFIXES)
    if unmatched:
        raise KeyError(f"no mapping for keys {unmatched[:4]}")
    pos, L = sd["pos_embed"], max_query_len
    sd["pos_embed"] = torch.cat([pos[:1], pos[1 + L:], pos[1:1 + L]])
    return sd


def _count_blocks(sd: dict, prefix: str) -> int:
    """Number of indexed blocks under a prefix, e.g. 23 for layer3.{0..22} of a ResNet-101."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _transvg_resnet(sd: dict) -> str:
    """The ResNet depth, from the block type (bottleneck or basic) and the number of layer3 blocks."""
    body = "visumodel.backbone.0.body."
    bottleneck = f"{body}layer1.0.conv3.weight" in sd
    blocks = _count_blocks(sd, f"{body}layer3.")
    name = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}.get(
        (bottleneck, blocks))
    if name is None:
        raise ValueError(f"unrecognised ResNet in TransVG checkpoint ({blocks} layer3 blocks)")
    return name


def _transvg_tokens(sd: dict, args: dict, backbone: str) -> tuple[bool, int]:
    """(dilation, max_query_len) from the rows of the position table, 1 + L + (imsize / stride)^2: the stride
    (32, or 16 dilated) that leaves a text length BERT can hold is the one the checkpoint was trained with."""
    rows, imsize = sd["vl_pos_embed.weight"].shape[0], int(args.get("imsize", 640))
    max_pos = sd["textmodel.bert.embeddings.position_embeddings.weight"].shape[0]
    dilatable = backbone in ("resnet50", "resnet101")
    fits = [(d, rows - 1 - (imsize // s) ** 2) for d, s in ((False, 32), (True, 16)) if dilatable or not d]
    fits = [(d, L) for d, L in fits if 2 <= L <= max_pos]
    if len(fits) > 1 and "dilation" in args:  # only tiny models are ambiguous; then args decide
        fits = [f for f in fits if f[0] == bool(args["dilation"])]
    if len(fits) != 1:
        raise ValueError(f"cannot infer dilation and max_query_len from {rows} position rows at imsize {imsize}")
    for key, val in zip(("dilation", "max_query_len"), fits[0]):
        if key in args and args[key] != val:
            raise ValueError(f"checkpoint args say {key}={args[key]} but its weights imply {val}")
    return fits[0]


def bert_config_from_weights(sd: dict, prefix: str) -> dict:
    """BERT_FIELDS of a BERT state dict under `prefix` (e.g. "textmodel.bert."), read off its shapes; the head
    count is hidden / 64, as in every released BERT (base 12, large 16): heads leave no trace in the shapes."""
    word = sd[f"{prefix}embeddings.word_embeddings.weight"]
    return {
        "vocab_size": word.shape[0], "hidden_size": word.shape[1],
        "num_hidden_layers": _count_blocks(sd, f"{prefix}encoder.layer."),
        "num_attention_heads": word.shape[1] // 64,
        "intermediate_size": sd[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0],
        "hidden_act": "gelu", "max_position_embeddings": sd[f"{prefix}embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": sd[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0],
        "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
    }


def _fusion_config(sd: dict, args: dict) -> dict:
    """The ModelConfig fields TransVG and QRNet share (BERT, fusion), read off the weights and, for the rest, args.
    A --bert_model path that is not here (QRNet's default ./checkpoints/bert-base-uncased) becomes its hub name."""
    bert = str(args.get("bert_model", "bert-base-uncased"))
    return dict(
        imsize=int(args.get("imsize", 640)), hidden_dim=sd["reg_token.weight"].shape[1],
        nheads=int(args.get("vl_nheads", 8)), dropout=float(args.get("vl_dropout", 0.1)),
        dim_feedforward=sd["vl_transformer.encoder.layers.0.linear1.weight"].shape[0],
        vl_layers=_count_blocks(sd, "vl_transformer.encoder.layers."),
        text_encoder=bert if os.path.isdir(bert) else os.path.basename(bert.rstrip("/")), text_init="random",
        text_config=bert_config_from_weights(sd, "textmodel.bert."), visual_init="random")


def transvg_config(sd: dict, args: dict) -> ModelConfig:
    """Infer our ModelConfig from the shapes of an official TransVG state dict (args only fill what shapes can't)."""
    if any(k.startswith("visumodel.backbone.1.") for k in sd):
        raise ValueError("TransVG checkpoints with --position_embedding learned are not supported (sine only)")
    backbone = _transvg_resnet(sd)
    dilation, max_query_len = _transvg_tokens(sd, args, backbone)
    return ModelConfig(backbone=backbone, dilation=dilation, max_query_len=max_query_len,
                       enc_layers=_count_blocks(sd, "visumodel.transformer.encoder.layers."),
                       **_fusion_config(sd, args))


# -----------------------------------------------------------------------------
# QRNet: its Swin, QD-ATT and neck by name (mmdet's, also in a Mask R-CNN Swin-S), the rest as TransVG's

# (official prefix, ours) for keys relative to the Swin backbone (mmdet's names plus QRNet's qdatt) and to the neck;
# '#' is an index. The first pair whose prefix matches renames a key, so the specific ones come first.
_GATES = [("ChannelGate.mlp.0.decoder.", "channel_down."), ("ChannelGate.mlp.2.decoder.", "channel_up."),
          ("SpatialGate.spatial.decoder.", "spatial.")]
BACKBONE_NAMES = [
    ("patch_embed.proj.", "patch_embed.0."), ("patch_embed.norm.", "patch_embed.2."),
    ("layers.#.blocks.#.mlp.fc1.", "stages.#.#.mlp.0."), ("layers.#.blocks.#.mlp.fc2.", "stages.#.#.mlp.3."),
    ("layers.#.blocks.", "stages.#."), ("layers.#.downsample.", "merges.#."), ("norm#.", "stage_norms.#."),
    *[(f"layers.#.qdatt.{theirs}", f"qdatt.#.{ours}") for theirs, ours in _GATES],
]
NECK_NAMES = [("lateral_convs.#.conv.", "lateral.#."),
              *[(f"fpn_down.#.qdatt.{theirs}", f"qdatt.#.{ours}") for theirs, ours in _GATES]]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for old, new in pairs:
        m = re.match(re.escape(old).replace(r"\#", r"(\d+)"), key)
        if m:
            return new.replace("#", "{}").format(*m.groups()) + key[m.end():]
    return None


def official_to_ours(sd: dict, backbone: str, neck: str, into: str = "") -> tuple[dict, list[str]]:
    """Our names (relative to QRNetVisual, each prefixed by `into`) for the Swin, QD-ATT and neck tensors of an official
    state dict whose backbone keys start with `backbone` ("backbone." in a Mask R-CNN checkpoint, "visumodel.backbone."
    in QRNet's) and neck keys with `neck`. relative_position_index buffers (49,49) are flattened as torchvision keeps
    them. Returns (renamed state dict, the keys with no counterpart: detection heads, the FPN's 3x3 convs, ...)."""
    renamed, left = {}, []
    for k, v in sd.items():
        name = None
        for prefix, pairs, ours in ((backbone, BACKBONE_NAMES, into), (neck, NECK_NAMES, into + "neck.")):
            if k.startswith(prefix) and _rename(k[len(prefix):], pairs):
                name = ours + _rename(k[len(prefix):], pairs)
        if name is None:
            left.append(k)
        else:
            renamed[name] = v.flatten() if name.endswith("relative_position_index") else v
    return renamed, left


def ours_to_official(sd: dict, backbone: str, neck: str) -> dict:
    """official_to_ours reversed: a state dict relative to QRNetVisual (no scale_embed: it has no official name) under
    the official (mmdet) names, Swin keys after `backbone`, the neck's after `neck`; relative_position_index back to
    mmdet's square (w^2,w^2). What toy.build_toy_swin saves, and tests fabricate official checkpoints with."""
    out = {}
    for k, v in sd.items():
        key, pairs, prefix = (k[len("neck."):], NECK_NAMES, neck) if k.startswith("neck.") else (
            k, BACKBONE_NAMES, backbone)
        name = _rename(key, [(ours, theirs) for theirs, ours in pairs])
        if name is None:
            raise KeyError(f"no official name for {k}")
        out[prefix + name] = v.view(math.isqrt(v.numel()), -1) if name.endswith("relative_position_index") else v
    return out


def qrnet_to_ours(sd: dict, max_query_len: int) -> dict:
    """Map an official QRNet state dict to ours: Swin, QD-ATT and neck by official_to_ours, the rest as
    TransVG's (position rows reordered); dropped, as they never run: BERT's pooler, the RPN head, scale-embedding
    rows 0-2 (QRNet adds rows 3 and 4 to its stride-32 and stride-64 levels; ours to the last two levels)."""
    visual, rest = official_to_ours(sd, "visumodel.backbone.", "visumodel.neck.", into="visual.")
    rest = {k: sd[k] for k in rest if not k.startswith(("visumodel.rpn_head.", "scale_embed."))}
    return {**visual, **transvg_to_ours(rest, max_query_len), "visual.scale_embed": sd["scale_embed.weight"][3:5]}


def qrnet_config(sd: dict, args: dict) -> ModelConfig:
    """Infer our ModelConfig from the shapes of an official QRNet state dict: the Swin's sizes (drop-path, which
    leaves no trace, is QRNet's 0.2), and the query length from the position rows, 1 + L + n^2 + ceil(n/2)^2 with
    n = imsize / 32 (imsize / 16 for a Swin of 3 stages)."""
    p = "visumodel.backbone.layers."
    stages = range(_count_blocks(sd, p))  # 4 for QRNet's Swin-S
    tables = [sd[f"{p}{s}.blocks.0.attn.relative_position_bias_table"] for s in stages]  # ((2w-1)^2, heads)
    sizes = {"embed_dim": sd["visumodel.backbone.patch_embed.proj.weight"].shape[0],
             "depths": [_count_blocks(sd, f"{p}{s}.blocks.") for s in stages],
             "num_heads": [t.shape[1] for t in tables], "window_size": (math.isqrt(tables[0].shape[0]) + 1) // 2,
             "drop_path": 0.2}
    named = next((name for name, s in qrnet.SWIN_SIZES.items() if s == sizes), None)
    fusion = _fusion_config(sd, args)
    neck = sd["visumodel.neck.lateral_convs.0.conv.weight"].shape[0]
    if neck != fusion["hidden_dim"]:
        raise ValueError(f"QRNet neck width {neck} differs from the fusion width {fusion['hidden_dim']}: unsupported")
    n = fusion["imsize"] // qrnet.deepest_stride(sizes["depths"])  # 32 for Swin-S
    max_query_len = sd["vl_pos_embed.weight"].shape[0] - 1 - n * n - ((n + 1) // 2) ** 2
    if args.get("max_query_len", max_query_len) != max_query_len or max_query_len < 2:
        raise ValueError(f"checkpoint args say max_query_len={args.get('max_query_len')} but its "
                         f"{sd['vl_pos_embed.weight'].shape[0]} position rows at imsize {fusion['imsize']} imply "
                         f"{max_query_len}")
    return ModelConfig(backbone=named or "swin_toy_qrnet", swin=None if named else sizes, max_query_len=max_query_len,
                       **fusion)
