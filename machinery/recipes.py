"""The recipes: the settings a run starts from per --dataset and student, under the command line.

    name, values, more = recipe({"dataset": "refcoco", "backbone": "swin_s_qrnet", ...})   # flags.parse_config calls it

Precedence: the dataclass defaults (train.TrainConfig's are the paper's TransVG recipe on RefCOCO), the dataset's
recipe (PRESETS), QRNet's on top for a QRNet student (QRNET_PRESETS), then the command line; the synthetic world brings
its own (world/recipe.py). resolve() fills what the flags leave implicit. References: EpmVG paper sec. 4.2; TransVG
(@ c862427) train.py; QRNet (@ 6aaa23c) train.py and its scripts.
"""

from dataclasses import replace

import data
import qrnet
from machinery import interop
from model import OFFICIAL_VISUAL_INITS, ModelConfig, resolve_text_config

# The paper's recipe per dataset (sec. 4.2): TransVG's DETR checkpoint for the visual branch, pretrained BERT, TransVG's
# query length (40 tokens for RefCOCOg), 180 epochs for RefCOCO+; the rest are TrainConfig's defaults.
PAPER = {"visual_init": "detr", "text_init": "pretrained", "text_encoder": "bert-base-uncased"}
PRESETS = {name: {**PAPER, "max_query_len": info.max_query_len} for name, info in data.DATASETS.items()
           if name != "shapes"}
PRESETS["refcoco+"].update(epochs=180, lr_drop=120)
# A QRNet student starts from a Mask R-CNN Swin-S (a file under --checkpoint_dir) and, with --qrnet_recipe qrnet (the
# default), trains with QRNet's own recipe on top: 180 epochs with lr x0.1 every 60 (StepLR: at 60 and 120; RefCOCO+:
# every 120, its README), batch 128 (its RefCOCO script: 8 GPUs x 16; ReferIt's: 8 x 8). Why the default: the paper's
# QRNet "w/o" rows are QRNet's published numbers, made with this recipe, so EpmVG's QRNet rows compare on it; the
# paper's own implementation details (sec. 4.2) give only TransVG's recipe, which --qrnet_recipe paper keeps.
QRNET_INIT = {"visual_init": "mask_rcnn"}
QRNET_PRESETS = {name: {"epochs": 180, "lr_drop": 120 if name == "refcoco+" else 60,
                        "batch_size": 128 if name.startswith("refcoco") else 64} for name in PRESETS}


def recipe(flags: dict) -> tuple[str, dict, list[type]]:
    """For parse_config: (the name, values and extra configs of the recipe that --dataset, --backbone and
    --qrnet_recipe ask for), QRNet's on top of the dataset's when the student is QRNet."""
    is_qrnet = flags["backbone"] in qrnet.SWIN_SIZES
    own = is_qrnet and flags.get("qrnet_recipe", "qrnet") == "qrnet"  # QRNet's schedule and batch, or the paper's
    name = flags["dataset"] + (" QRNet" if own else " (QRNet, the paper's recipe)" if is_qrnet else "")
    if flags["dataset"] == "shapes":
        from world.recipe import SHAPES, SHAPES_QRNET, WorldConfig
        return name, {**SHAPES, **(SHAPES_QRNET if is_qrnet else {})}, [WorldConfig]
    values = {**PRESETS.get(flags["dataset"], {}), **(QRNET_INIT if is_qrnet else {}),
              **(QRNET_PRESETS.get(flags["dataset"], {}) if own else {})}
    return name, values, []  # an unknown --dataset has none: DataConfig refuses it once the flags are read


def resolve(dcfg: data.DataConfig, mcfg: ModelConfig, checkpoint_dir: str, vocab_size: int) -> ModelConfig:
    """Fill what the flags leave implicit, once, before anything is built: the DETR or Mask R-CNN checkpoint path and
    BERT's full config (so a checkpoint rebuilds it offline). What this returns is what checkpoints hold."""
    if mcfg.visual_init in OFFICIAL_VISUAL_INITS:
        mcfg = replace(mcfg, visual_init=interop.official_visual_checkpoint(
            mcfg.visual_init, mcfg.backbone, data.DATASETS[dcfg.dataset].detr, checkpoint_dir))
    return resolve_text_config(mcfg, vocab_size if mcfg.text_init == "random" else None)
