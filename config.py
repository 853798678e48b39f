"""A training run's settings in one place: TrainConfig, the recipes that override its defaults per dataset and student
(presets), and the settings a resumed run continues with. DataConfig and ModelConfig live with their code (data.py,
model.py); flags.py turns all three into flags.

    recipe("refcoco", "resnet50")        # the paper's TransVG recipe on RefCOCO
    recipe("refcoco", "swin_s_qrnet")    # QRNet's recipe on top: the paper's best rows
    recipe("shapes", "resnet18")         # the synthetic world's laptop run: what `python train.py` does

The order of precedence is: the dataclass defaults (TrainConfig, DataConfig, ModelConfig), then the dataset's recipe
(PRESETS), then QRNet's on top of it when the student is QRNet (QRNET_PRESETS), then the command line; --help shows
the values that will run, naming the recipe that sets them.

References: EpmVG paper sec. 4.2; TransVG (github.com/djiajunustc/TransVG @ c862427) train.py; QRNet
(github.com/LukeForeverYoung/QRNet @ 6aaa23c) train.py and its scripts.
"""

import dataclasses
import os
from dataclasses import dataclass, replace

import data
import qrnet
from clip_teacher import DEFAULT_TEACHER
from files import read_checkpoint
from flags import UsageError, check_fields
from interop import checkpoint_kind
from runtime import DTYPE_NAMES, device_rule

FORMAT_VERSION = 3  # of train.py's checkpoints. 2: the data flags moved to data_config; 3: the toy models' steps too

# -----------------------------------------------------------------------------
# TrainConfig: how the student is trained (the paper's recipe for TransVG on RefCOCO by default)


@dataclass
class TrainConfig:
    train_split: str = "train"  # split to train on
    eval_split: str = "val"  # split for model selection during training (best.pt)
    augment: bool = True  # TransVG's train augmentation (scale, crop, colour, flip with word swap, translate)
    epochs: int = 90  # paper: 90 (180 for RefCOCO+)
    lr_drop: int = 60  # every lr x0.1 from this epoch on (paper: 60; 120 for RefCOCO+)
    lr_schedule: str = "step"  # step (x0.1 at lr_drop: TransVG) or cosine (to 0 at the end of the last epoch)
    batch_size: int = 64  # global images per optimizer step (paper: 8 GPUs x 8)
    micro_batch: int = 8  # images per device per forward; gradient accumulation makes up batch_size
    lr: float = 1e-4  # fusion transformer, projections, [REG], position table, box head (QRNet: + QD-ATT, scales)
    lr_visual: float = 1e-5  # ResNet and DETR encoder; QRNet: Swin and the neck's lateral convs (+ a trainable CLIP)
    lr_text: float = 1e-5  # BERT
    weight_decay: float = 1e-4  # AdamW, on every parameter like TransVG
    warmup_steps: int = 0  # linear lr warmup in optimizer steps (TransVG: none)
    clip_grad: float = 0.0  # max gradient norm, 0 = off (TransVG: off)
    max_steps: int = 0  # stop after this many optimizer steps in all (0 = the whole schedule)
    box_loss: str = "l1"  # l1 (TransVG's code, which the paper's baselines reproduce) or smooth_l1 (eq. 8)
    giou_weight: float = 1.0  # lambda of eq. 8
    distill: str = "cos"  # cos (eq. 7), l1 (Table 3 #2), or none (the TransVG baseline)
    distill_modality: str = "both"  # both, image (Table 3 #3) or text (Table 3 #4)
    distill_loc: str = "loc1"  # loc1 (fusion output, default) ... loc4 (CNN / BERT embeddings): Table 4
    alpha: float = 1.5  # weight of the image term
    beta: float = 2.0  # weight of the text term
    teacher: str = DEFAULT_TEACHER  # CLIP hub name or local directory
    teacher_init: str = "pretrained"  # pretrained, or random: the teacher's architecture untrained (the control)
    teacher_trainable: bool = False  # Table 5 "unfrozen": CLIP trains at lr_visual with the distillation grads
    teacher_text_cache: int = 0  # frozen teacher: keep this many text embeddings, keyed on the exact expression
    cache_visual: bool = False  # frozen visual branch: its tokens, and teacher targets, once per sample (precompute.py)
    checkpoint_dir: str = "checkpoints"  # where visual_init=detr / mask_rcnn finds detr-r50-unc.pth, unc_latest.pth..
    out_dir: str = ""  # default out/<dataset> (out/<dataset>_2, _3, ... when that holds an earlier run)
    overwrite: bool = False  # start over in an --out_dir that holds a run: its checkpoints and log are deleted
    resume: str = ""  # a last.pt to continue from
    save_every: int = 200  # also write last.pt every this many optimizer steps (0 = only at epoch ends)
    eval_every: int = 0  # optimizer steps between evaluations (0 = at the end of every epoch)
    eval_batch: int = 32  # images per device when evaluating
    final_eval: bool = True  # at the end, evaluate every split the papers report and print the table
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
    dtype: str = "auto"  # autocast: auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16 (+scaler)
    compile: bool = False  # torch.compile the student
    channels_last: bool = False  # channels_last memory format for the ResNet (faster with bf16 on GPUs)
    num_workers: int = 4  # data loader processes per device
    seed: int = 13  # base seed; rank r uses seed + r (TransVG: 13)
    dry_run: bool = False  # only check the flags and that every input is in place (check_inputs); write nothing

    def __post_init__(self) -> None:  # refused when the flags are read, not after minutes of loading
        check_fields(self, [
            *[(k, getattr(self, k) >= 1, ">= 1") for k in ("epochs", "batch_size", "micro_batch", "eval_batch")],
            *[(k, getattr(self, k) >= 0, ">= 0") for k in (
                "lr_drop", "lr_visual", "lr_text", "weight_decay", "warmup_steps", "clip_grad", "max_steps",
                "giou_weight", "alpha", "beta", "teacher_text_cache", "eval_every", "save_every", "num_workers")],
            ("lr", self.lr > 0, "> 0"),
            ("batch_size", self.micro_batch < 1 or self.batch_size % self.micro_batch == 0,
             f"a multiple of micro_batch = {self.micro_batch}"),
            ("box_loss", self.box_loss in ("l1", "smooth_l1"), "l1 or smooth_l1"),
            ("lr_schedule", self.lr_schedule in ("step", "cosine"), "step or cosine"),
            ("cache_visual", not (self.cache_visual and self.augment),
             "false with --augment (the cache holds one unaugmented view)"),
            ("distill", self.distill in ("cos", "l1", "none"), "cos, l1 or none"),
            ("distill_modality", self.distill_modality in ("both", "image", "text"), "both, image or text"),
            ("distill_loc", self.distill_loc in ("loc1", "loc2", "loc3", "loc4"), "loc1, loc2, loc3 or loc4"),
            ("teacher_init", self.teacher_init in ("pretrained", "random"), "pretrained or random"),
            ("teacher_text_cache", not (self.teacher_text_cache and self.teacher_trainable),
             "0 with --teacher_trainable (the cache would go stale)"),
            ("dtype", self.dtype in DTYPE_NAMES, "auto, float32, bfloat16 or float16"),
            device_rule(self.device),
            ("overwrite", not (self.overwrite and self.resume), "not both --overwrite and --resume")])


# -----------------------------------------------------------------------------
# the paper's datasets

# The paper's recipe per dataset: the DETR checkpoint of TransVG for the visual branch, pretrained BERT, TransVG's
# query length (40 tokens for RefCOCOg), 180 epochs for RefCOCO+. The rest (AdamW, lr 1e-4 and 1e-5, batch 64, 90
# epochs with lr x0.1 at 60, distillation on) are TrainConfig's defaults.
PAPER = {"visual_init": "detr", "text_init": "pretrained", "text_encoder": "bert-base-uncased"}
PRESETS = {name: {**PAPER, "max_query_len": info.max_query_len} for name, info in data.DATASETS.items()
           if name != "shapes"}
PRESETS["refcoco+"].update(epochs=180, lr_drop=120)

# QRNet's recipe on top, for a QRNet student on a real dataset: the Mask R-CNN Swin-S it starts from (resolved to a
# file under --checkpoint_dir), 180 epochs with lr x0.1 from 60 (RefCOCO+: 120, its README), batch 128 (its RefCOCO
# script: 8 GPUs x 16; ReferIt's: 8 x 8). Its per-group lrs are ours: train.param_groups.
QRNET_PRESETS = {name: {"visual_init": "mask_rcnn", "epochs": 180, "lr_drop": 120 if name == "refcoco+" else 60,
                        "batch_size": 128 if name.startswith("refcoco") else 64} for name in PRESETS}

# -----------------------------------------------------------------------------
# the synthetic world: the paper's setting in miniature, on a laptop CPU

# The student starts from a pretrained visual branch (the toy DETR, frozen, so its tokens are computed once per scene:
# cache_visual, precompute.py) and learns BERT and the fusion on a small grounding split (10,000 scenes, in which
# shapes.RARE_WORDS are rare), while the toy CLIP has learned from 38,400 captions of other scenes that say every word
# at its natural frequency (toy.py builds both, world.py before the run). A ResNet-18 to layer3 (stride 16) at a
# 64 px canvas gives 4 x 4 tokens; 1 encoder + 4 fusion layers of width 64; a 1-layer BERT over the world's 24 words
# without dropout; the fusion's positions start small (pos_std 0.02); 32 epochs in batches of 64 (4,992 steps), AdamW
# at 5e-4 with a cosine decay. The learning rate was chosen on the baseline (--distill none: 2e-3 never leaves the
# plateau of one central box, 1e-3 and 2.5e-4 end lower than 5e-4) and the distillation is added on top unchanged,
# as the paper adds it to TransVG's recipe. The length is set by the slowest arm, for every arm alike: with the
# distillation the fused tokens leave the plateau later (step 1,000-2,000 against the baseline's ~500-1,000), and
# 24 epochs left a late escape at 70 % (docs/synthetic_world.md). Data loading stays in the main process: on
# 2 cores a worker process only competes with the model for them.
PRESETS["shapes"] = dict(
    backbone="resnet18", resnet_stages=3, trainable_bn=True, imsize=64, hidden_dim=64, nheads=4,
    dim_feedforward=128, dropout=0.0, enc_layers=1, vl_layers=4, pos_std=0.02, max_query_len=16,
    text_encoder="out/shapes_vocab", text_init="random",
    text_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128,
                 "max_position_embeddings": 32, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
    visual_init="out/shapes_detr.pth", teacher="out/shapes_clip", cache_visual=True, augment=False,
    epochs=32, lr_schedule="cosine", warmup_steps=50, clip_grad=1.0, batch_size=64, micro_batch=64,
    lr=5e-4, lr_text=5e-4, shapes_train_size=10000, num_workers=0, eval_batch=250, eval_every=500)

# A QRNet student (--backbone swin_toy_qrnet) on the same world, with the same toy CLIP, BERT and fusion: its visual
# branch reads the expression, so it can be neither the toy DETR nor cached. As QRNet starts from a Mask R-CNN Swin,
# it starts from a toy one (toy.build_toy_swin: the Swin and the neck's lateral convs pretrained to detect the world's
# objects without text, --toy_detr_steps steps; QD-ATT at its initialisation), which trains at a tenth of the lr of
# what is new (QD-ATT, scale embeddings, fusion, head) and of the random toy BERT: QRNet's split, scaled. Its Swin has
# 3 stages (qrnet.SWIN_SIZES), as the TransVG toy's ResNet stops at layer3: on the same 64 px canvas, maps 16/8/4
# (windows of 4), and the fusion reads strides 16 and 32, 4 x 4 + 2 x 2 tokens; pos_std 1 is TransVG's nn.Embedding
# init. Batch 32 for 12 epochs (3,744 steps, cosine): chosen on --distill none, as the TransVG default's recipe was,
# and as long as 15 minutes allow. It does not reach issue 23's goal: 15 minutes from an empty out/ on 2 cores and
# val 53 % with the distillation; --epochs 32 levels off under 80 % as well (docs/qrnet.md: the runs, the controls,
# the probes, what might close the gap).
QRNET_PRESETS["shapes"] = dict(
    resnet_stages=4, visual_init="out/shapes_swin.pth", toy_detr_steps=600, cache_visual=False, augment=False,
    imsize=64, pos_std=1.0, epochs=12, lr_schedule="cosine", warmup_steps=50, clip_grad=1.0, batch_size=32,
    micro_batch=32, lr=5e-4, lr_visual=5e-5, lr_text=5e-4, eval_every=500)

# -----------------------------------------------------------------------------
# which recipe a run's flags ask for


def recipe(dataset: str, backbone: str) -> dict:
    """The defaults of a run on `dataset` with the student `backbone`: the dataset's recipe, with QRNet's on top
    when the student is QRNet."""
    qrnet_recipe = QRNET_PRESETS.get(dataset, {}) if backbone in qrnet.SWIN_SIZES else {}
    return {**PRESETS.get(dataset, {}), **qrnet_recipe}


def defaults(flags: dict) -> tuple[str, dict]:
    """For flags.parse_config: (the recipe's name, its values) for the flags as first read."""
    name = flags["dataset"] + (" QRNet" if flags["backbone"] in qrnet.SWIN_SIZES else "")
    return name, recipe(flags["dataset"], flags["backbone"])


# -----------------------------------------------------------------------------
# a resumed run: its checkpoint's settings, and the flags that may change

# What a resumed run may change: where and how fast it runs, when it stops and evaluates. Anything else would make
# it a different run than the one it continues.
# --epochs may grow: the lr is a pure function of the step (lr_factor), so the run goes on with the longer schedule.
RESUME_MAY_CHANGE = {"resume", "max_steps", "out_dir", "device", "dtype", "compile", "channels_last", "num_workers",
                     "micro_batch", "eval_every", "eval_batch", "final_eval", "checkpoint_dir", "save_every", "epochs",
                     "dry_run"}


def resume_configs(configs: list, argv: list[str]) -> list:
    """--resume continues the checkpoint's run: its configs, with the flags given now on top if they may change.
    configs: [TrainConfig, DataConfig, ModelConfig] as parsed; returns the same three, resumed."""
    path = configs[0].resume
    ckpt = read_checkpoint(path, "--resume")
    if "train_config" not in ckpt:
        what = {"qrnet": "an official QRNet checkpoint", "transvg": "an official TransVG checkpoint",
                "detr": "a DETR checkpoint"}.get(checkpoint_kind(ckpt), "a model without its training state")
        raise UsageError(f"--resume {path}: {what}, not a last.pt of train.py, so there is no run to continue. "
                         f"Evaluate it with `python evaluate.py --ckpt {path}`, or start a new run from its visual "
                         f"branch with --visual_init {path}")
    if ckpt.get("format_version") not in (2, FORMAT_VERSION):
        raise UsageError(f"--resume {path}: written by a train.py of format {ckpt.get('format_version')} (git "
                         f"{ckpt.get('git_sha', 'unknown')}); this one resumes formats 2 and {FORMAT_VERSION}. Resume "
                         f"it with the code it was written by, or evaluate it with evaluate.py --ckpt")
    saved = [dict(ckpt[key]) for key in ("train_config", "data_config", "model_config")]
    for key in ("toy_teacher_steps", "toy_detr_steps"):  # format 2 kept them in train_config
        if key in saved[0]:
            saved[1][key] = saved[0].pop(key)
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    cfg, dcfg, mcfg = merge_resumed(configs, saved, given, RESUME_MAY_CHANGE, f"--resume {path}")
    if cfg.epochs < saved[0]["epochs"]:
        raise UsageError(f"--epochs {cfg.epochs}: the run of --resume {path} is {saved[0]['epochs']} epochs long; a "
                         f"resumed run can train longer, not shorter (--max_steps stops it early)")
    if "out_dir" not in given:  # the run goes on where its checkpoint is, wherever the folder has moved since
        cfg = replace(cfg, out_dir=os.path.dirname(path) or ".")
    return [cfg, dcfg, mcfg]


def merge_resumed(configs: list, saved: list[dict], given: set[str], may_change: set[str], what: str) -> list:
    """The configs a resumed run continues with: each saved config (a dict of the same dataclass as configs[i]),
    with the fields named in `given` (the flags on the command line) taken from configs, if they may change.
    Any other given field that differs is an error naming it (`what` says which checkpoint)."""
    olds = [type(c)(**s) for c, s in zip(configs, saved)]
    new = {k: v for c in configs for k, v in dataclasses.asdict(c).items()}
    old = {k: v for c in olds for k, v in dataclasses.asdict(c).items()}

    def same(k: str) -> bool:  # a saved dict field (BERT's resolved config) may be given in part by the flag
        if isinstance(new[k], dict) and isinstance(old[k], dict):
            return all(old[k].get(key) == value for key, value in new[k].items())
        return new[k] == old[k]

    changed = sorted(k for k in given - may_change if k in new and not same(k))
    if changed:
        raise UsageError(f"{what}: {', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in changed)}: a resumed run "
                         f"continues its checkpoint's run, so only {sorted(may_change)} may change; start a new run "
                         f"(--out_dir) to change the rest")
    return [dataclasses.replace(o, **{k: new[k] for k in given & set(dataclasses.asdict(o)) if k in may_change})
            for o in olds]
