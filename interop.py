"""Official TransVG checkpoints as GroundingModels: their keys, the architecture read off their weights, loading.

    model = interop.load_model("TransVG_unc.pth")      # or one of ours: the same call, the same GroundingModel

An official checkpoint ({'model', 'optimizer', 'lr_scheduler', 'epoch', 'args', 'val_accu'}, written by TransVG's
train.py with a pickled argparse.Namespace, which read_checkpoint allows and nothing else) is mapped key by key onto
ours and loaded strictly. Parity with the official code (same pred_boxes and fusion outputs on the same inputs):
tests/test_transvg_parity.py and the README.

References: TransVG, github.com/djiajunustc/TransVG @ c862427 (models/trans_vg.py, train.py).
"""

import torch

from model import GroundingModel, ModelConfig, read_checkpoint, rename_keys


def load_model(path: str, map_location: str | torch.device = "cpu", ckpt: dict | None = None) -> GroundingModel:
    """The model any checkpoint we read holds, built with no network access, in eval mode: ours (train.py) or an
    official TransVG one. ckpt: the file's contents if the caller has already read them (read_checkpoint)."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    if "model_config" in ckpt:
        return GroundingModel.from_checkpoint(path, map_location, ckpt)
    sd = ckpt.get("model")
    if not (isinstance(sd, dict) and "vl_pos_embed.weight" in sd):
        raise ValueError(f"{path}: neither our checkpoint (no 'model_config') nor TransVG's (no 'model' dict with "
                         f"vl_pos_embed.weight)")
    cfg = transvg_config(sd, ckpt.get("args") or {})
    model = GroundingModel(cfg)
    model.load_state_dict(transvg_to_ours(sd, cfg.max_query_len))
    return model.to(map_location).eval()


# -----------------------------------------------------------------------------
# TransVG: key mapping both ways, and the architecture read off the weights

# TransVG key prefix -> ours. textmodel.bert.pooler.* has no counterpart (we drop the unused pooler).
TRANSVG_PREFIXES = {
    "visumodel.backbone.0.body.": "backbone.",
    "visumodel.input_proj.": "input_proj.",
    "visumodel.transformer.encoder.layers.": "visual_encoder.layers.",
    "textmodel.bert.": "text_encoder.",
    "vl_pos_embed.weight": "pos_embed",
    "reg_token.weight": "reg_token",
    "visu_proj.": "visual_proj.",
    "text_proj.": "text_proj.",
    "vl_transformer.encoder.layers.": "fusion.layers.",
    "bbox_embed.layers.0.": "bbox_head.0.",
    "bbox_embed.layers.1.": "bbox_head.2.",
    "bbox_embed.layers.2.": "bbox_head.4.",
}


def _rename_all(sd: dict, prefixes: dict[str, str]) -> dict:
    renamed, unmatched = rename_keys(sd, prefixes)
    if unmatched:
        raise KeyError(f"no mapping for keys {unmatched[:4]}")
    return renamed


def transvg_to_ours(sd: dict, max_query_len: int) -> dict:
    """Map an official TransVG state dict to ours: rename keys, drop BERT's pooler, and reorder the position rows
    from TransVG's [REG, L text, N visual] to the paper's [REG, N visual, L text]."""
    sd = _rename_all({k: v for k, v in sd.items() if not k.startswith("textmodel.bert.pooler.")}, TRANSVG_PREFIXES)
    pos, L = sd["pos_embed"], max_query_len
    sd["pos_embed"] = torch.cat([pos[:1], pos[1 + L:], pos[1:1 + L]])
    return sd


def ours_to_transvg(sd: dict, max_query_len: int) -> dict:
    """The inverse of transvg_to_ours (without the pooler, which we never had)."""
    sd = _rename_all(sd, {v: k for k, v in TRANSVG_PREFIXES.items()})
    pos, L = sd["vl_pos_embed.weight"], max_query_len
    sd["vl_pos_embed.weight"] = torch.cat([pos[:1], pos[-L:], pos[1:-L]])
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


def transvg_config(sd: dict, args: dict) -> ModelConfig:
    """Infer our ModelConfig from the shapes of an official TransVG state dict (args only fill what shapes can't)."""
    if any(k.startswith("visumodel.backbone.1.") for k in sd):
        raise ValueError("TransVG checkpoints with --position_embedding learned are not supported (sine only)")
    backbone = _transvg_resnet(sd)
    dilation, max_query_len = _transvg_tokens(sd, args, backbone)
    return ModelConfig(
        backbone=backbone, dilation=dilation, imsize=int(args.get("imsize", 640)),
        hidden_dim=sd["reg_token.weight"].shape[1], nheads=int(args.get("vl_nheads", 8)),
        dropout=float(args.get("vl_dropout", 0.1)),
        dim_feedforward=sd["vl_transformer.encoder.layers.0.linear1.weight"].shape[0],
        enc_layers=_count_blocks(sd, "visumodel.transformer.encoder.layers."),
        vl_layers=_count_blocks(sd, "vl_transformer.encoder.layers."), max_query_len=max_query_len,
        text_encoder=str(args.get("bert_model", "bert-base-uncased")), text_init="random",
        text_config=bert_config_from_weights(sd, "textmodel.bert."), visual_init="random")
