"""Train EpmVG: the TransVG student with the CLIP distillation loss (paper eq. 8), on CPU, one GPU or many.

    python train.py                                              # synthetic world, laptop CPU, minutes
    python train.py --dataset refcoco                            # one GPU: the paper's recipe, grad accumulation
    torchrun --nproc_per_node=8 train.py --dataset refcoco       # the paper's 8 GPUs x 8 images
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --dataset refcoco
    python train.py --dataset refcoco --distill none             # the TransVG baseline ("w/o" rows)
    torchrun --nproc_per_node=8 train.py --dataset refcoco --backbone swin_s_qrnet   # QRNet as the student
    python train.py --resume out/refcoco/last.pt                 # continue exactly where it stopped
    python train.py --resume out/refcoco/last.pt --epochs 120    # train a run longer (the lr follows 120 epochs)
    python train.py --dataset refcoco --dry_run                  # only check that every input is in place

Every field of TrainConfig, DataConfig and ModelConfig is a flag (--key value or --key=value; --help lists them).
Per-dataset presets (PRESETS) hold the paper's recipe; flags override them. Before anything is built, downloaded or
written, check_inputs checks every flag and input the run needs and reports all that are wrong in one message (exit
status 2). train() reads top to bottom: config, device, data, model, teacher, optimizer, resume, loop. Checkpoints
are plain data (weights_only=True loads them), hold the student only (the teacher is stored by name), and are written
atomically by rank 0.

References: EpmVG paper sec. 4.2; TransVG (github.com/djiajunustc/TransVG @ c862427) train.py and engine.py.
"""

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import BertConfig

import data
import interop
import qrnet
import runtime
import shapes
import toy
import transforms
from clip_teacher import CLIPTeacher
from evaluate import evaluate, print_table
from interop import checkpoint_kind
from losses import distill_loss, total_loss
from model import (GroundingModel, ModelConfig, check_text_length, count_parameters, read_checkpoint,
                   resolve_text_config)
from runtime import DeviceEnv, UsageError, check_fields, print0

FORMAT_VERSION = 2  # 2: the data flags moved from train_config to data_config

# -----------------------------------------------------------------------------
# config


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
    teacher: str = "openai/clip-vit-base-patch16"  # CLIP hub name or local directory
    teacher_init: str = "pretrained"  # pretrained, or random: the teacher's architecture untrained (the control)
    teacher_trainable: bool = False  # Table 5 "unfrozen": CLIP trains at lr_visual with the distillation grads
    teacher_text_cache: int = 0  # frozen teacher: keep this many text embeddings, keyed on the exact expression
    toy_teacher_steps: int = toy.ToyCLIPConfig.steps  # shapes: training steps of the toy CLIP that is built when --teacher is missing
    toy_detr_steps: int = toy.ToyDETRConfig.steps  # shapes: training steps of the toy DETR that is built when --visual_init is missing
    cache_visual: bool = False  # freeze the visual branch; its tokens (and the teacher's targets) once per sample
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
                "giou_weight", "alpha", "beta", "teacher_text_cache", "toy_teacher_steps", "toy_detr_steps",
                "eval_every", "save_every", "num_workers")],
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
            ("dtype", self.dtype in runtime.DTYPE_NAMES, "auto, float32, bfloat16 or float16"),
            ("device", self.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"), "auto, cpu, cuda or mps"),
            ("overwrite", not (self.overwrite and self.resume), "not both --overwrite and --resume")])


# The paper's recipe per dataset: the DETR checkpoint of TransVG for the visual branch, pretrained BERT, TransVG's
# query length (40 tokens for RefCOCOg), 180 epochs for RefCOCO+. The synthetic world's preset lives in toy.py.
PAPER = {"visual_init": "detr", "text_init": "pretrained", "text_encoder": "bert-base-uncased"}
PRESETS = {name: {**PAPER, "max_query_len": info.max_query_len} for name, info in data.DATASETS.items()
           if name != "shapes"}
PRESETS["refcoco+"].update(epochs=180, lr_drop=120)
PRESETS["shapes"] = toy.PRESET
# QRNet's recipe on top, for a QRNet backbone on a real dataset (its train.py and scripts, LukeForeverYoung/QRNet @
# 6aaa23c): the Mask R-CNN Swin-S it starts from (resolve finds it), 180 epochs with lr x0.1 from 60 (RefCOCO+: 120, its
# README), batch 128 (its RefCOCO script: 8 GPUs x 16; ReferIt's: 8 x 8). Its per-group lrs are ours: param_groups.
QRNET_PRESETS = {name: {"visual_init": "mask_rcnn", "epochs": 180, "lr_drop": 120 if name == "refcoco+" else 60,
                        "batch_size": 128 if name.startswith("refcoco") else 64} for name in PRESETS if name != "shapes"}
QRNET_PRESETS["shapes"] = toy.QRNET_PRESET


def preset(flags: dict) -> dict:
    """The defaults a run's flags imply: the recipe of its dataset (--dataset), with QRNet's on top when the student
    is QRNet (--backbone swin_s_qrnet)."""
    qrnet_recipe = QRNET_PRESETS.get(flags["dataset"], {}) if flags["backbone"] in qrnet.SWIN_SIZES else {}
    return {**PRESETS.get(flags["dataset"], {}), **qrnet_recipe}


def resolve(cfg: TrainConfig, dcfg: data.DataConfig, mcfg: ModelConfig, vocab_size: int
            ) -> tuple[TrainConfig, ModelConfig]:
    """Fill what the flags leave implicit, once, before anything is built: the DETR or Mask R-CNN checkpoint path and
    BERT's full config (so a checkpoint rebuilds it offline). What this returns is what checkpoints hold."""
    if mcfg.visual_init in ("detr", "mask_rcnn"):
        mcfg = replace(mcfg, visual_init=interop.official_visual_checkpoint(
            mcfg.visual_init, mcfg.backbone, data.DATASETS[dcfg.dataset].detr, cfg.checkpoint_dir))
    return cfg, resolve_text_config(mcfg, vocab_size if mcfg.text_init == "random" else None)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of every base lr at an optimizer step: linear warmup, then x0.1 from epoch lr_drop (TransVG's
    StepLR) or a cosine to 0 at the end of the last epoch (--max_steps stops early, it does not squeeze the
    schedule). A pure function of the step, so resuming needs no scheduler state."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * step / (cfg.epochs * steps_per_epoch)))
    return warm * (0.1 if step >= cfg.lr_drop * steps_per_epoch else 1.0)


def param_groups(model: GroundingModel, teacher: CLIPTeacher | None, cfg: TrainConfig) -> list[dict]:
    """TransVG's groups: visual branch and BERT at 1e-5, everything new at 1e-4; a trainable teacher joins the
    visual lr (paper Table 5). Weight decay on every parameter, biases and norms included, as TransVG does.
    QRNet's: Swin, its stage norms, the neck's lateral convs and BERT at 1e-5; every QD-ATT (backbone and neck), the
    scale embeddings and the fusion at 1e-4."""
    groups = {"fusion": [], "visual": [], "text": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = ("fusion" if ".qdatt." in name or name == "backbone.scale_embed" else  # QRNet's: new, at 1e-4
                    "visual" if name.startswith(("backbone.", "input_proj.", "visual_encoder.")) else
                    "text" if name.startswith("text_encoder.") else "fusion")
            groups[kind].append(p)
    base = {"fusion": cfg.lr, "visual": cfg.lr_visual, "text": cfg.lr_text}
    out = [{"name": k, "params": v, "base_lr": base[k], "lr": base[k]} for k, v in groups.items()]
    if teacher is not None and cfg.teacher_trainable:
        out.append({"name": "teacher", "params": list(teacher.parameters()), "base_lr": cfg.lr_visual,
                    "lr": cfg.lr_visual})
    return out


# -----------------------------------------------------------------------------
# data order: a pure function of (seed, epoch, rank) (runtime.EpochSeeded), so a resumed run sees the same samples


def epoch_batches(train_set: runtime.EpochSeeded, step: int, steps_per_epoch: int, cfg: TrainConfig, env: DeviceEnv):
    """An iterator over this rank's micro-batches from optimizer step `step` to the end of its epoch."""
    epoch = step // steps_per_epoch
    train_set.epoch = epoch
    order = runtime.epoch_indices(len(train_set), epoch, cfg.seed, env.rank, env.world_size, cfg.batch_size)
    order = order[(step % steps_per_epoch) * cfg.batch_size // env.world_size:]  # skip what a resume has done
    # its own generator: a DataLoader otherwise draws its worker seed from the global RNG (dropout's stream)
    return iter(DataLoader(train_set, batch_size=cfg.micro_batch, sampler=order.tolist(), collate_fn=data.collate,
                           num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda", drop_last=True,
                           generator=torch.Generator()))


# -----------------------------------------------------------------------------
# one optimizer step, and when to evaluate


def eval_due(step: int, epoch_end: int, total_steps: int, eval_every: int) -> bool:
    """After optimizer step `step`: every eval_every steps and at the very end, or (eval_every = 0) every epoch."""
    return step % eval_every == 0 or step == total_steps if eval_every else step == epoch_end


def optimizer_step(model: torch.nn.Module, teacher: CLIPTeacher | None, widths: tuple, batches,
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, lr_scale: float, accum: int,
                   cfg: TrainConfig, env: DeviceEnv, step: int) -> dict[str, float]:
    """Forward, eq. 8 and backward on `accum` micro-batches (gradients all-reduced on the last one only), then the
    update at lr x lr_scale. widths: what the teacher's targets are pooled to (None: that tower is not run).
    Returns each loss term's mean over the global batch; a non-finite one stops the run before the update, on
    every rank at once."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_scale
    sums = {}
    for micro in range(accum):
        batch = {k: v.to(env.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        cached = (batch["vis"], batch["vis_is_pad"], batch["cnn"]) if cfg.cache_visual else None  # toy.CachedVisual
        images = batch.get("image")
        if cfg.channels_last and not cached:
            images = images.contiguous(memory_format=torch.channels_last)
        with model.no_sync() if env.ddp and micro < accum - 1 else contextlib.nullcontext():
            with runtime.autocast_for(env.device, cfg.dtype):
                out = model(images, batch.get("img_is_pad"), batch["input_ids"], batch["attention_mask"], cached)
            distill_terms = {}
            if teacher is not None:
                targets = ((batch.get("teacher_image"), batch.get("teacher_text")) if "image" not in batch else
                           teacher.targets(transforms.unnormalise(images), batch["text"], widths))
                distill_terms = distill_loss(out["distill"][cfg.distill_loc], targets, cfg.distill,
                                             cfg.distill_modality, cfg.alpha, cfg.beta)
            loss, terms = total_loss(out["pred_boxes"], batch["target"], cfg.box_loss, cfg.giou_weight,
                                     distill_terms)
            scaler.scale(loss / accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach() / accum
    values = torch.stack(list(sums.values())).float()  # one small all-reduce: the global mean, and NaN on all ranks
    if env.ddp:
        dist.all_reduce(values)
        values /= env.world_size
    terms = dict(zip(sums, values.tolist()))
    if not all(math.isfinite(v) for v in terms.values()):
        raise FloatingPointError(f"non-finite loss at optimizer step {step}: {terms}; stopped before the update, so "
                                 f"{cfg.out_dir}/last.pt is the last good checkpoint")
    if teacher is not None and cfg.teacher_trainable and env.ddp:
        runtime.average_gradients(teacher.parameters(), env.world_size)  # the teacher is outside DDP
    if cfg.clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return terms


# -----------------------------------------------------------------------------
# checkpoints and resume


def save_checkpoint(name: str, step: int, best: float, *, model: GroundingModel, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, teacher: CLIPTeacher | None, configs: dict, steps_per_epoch: int,
                    cfg: TrainConfig, env: DeviceEnv) -> None:
    """out_dir/name with everything a resume needs (runtime.save_training_state), the configs, the teacher's name
    and hash (a trainable teacher's weights go beside it, name + ".teacher", never inside the student's)."""
    teacher_id = None if teacher is None else {"name": teacher.name, "sha256": teacher.weights_sha256}
    runtime.save_training_state(os.path.join(cfg.out_dir, name), model, optimizer, scaler, env, {
        **configs, "step": step, "epoch": step // steps_per_epoch, "best_metric": best, "teacher": teacher_id,
        "format_version": FORMAT_VERSION},
        sidecar=teacher.model if teacher is not None and teacher.trainable else None)


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
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"--resume {path}: written by a train.py of format {ckpt.get('format_version')} (git "
                         f"{ckpt.get('git_sha', 'unknown')}); this one resumes format {FORMAT_VERSION}. Resume it "
                         f"with the code it was written by, or evaluate it with evaluate.py --ckpt")
    saved = [ckpt[key] for key in ("train_config", "data_config", "model_config")]
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    cfg, dcfg, mcfg = runtime.merge_resumed(configs, saved, given, RESUME_MAY_CHANGE, f"--resume {path}")
    if cfg.epochs < saved[0]["epochs"]:
        raise UsageError(f"--epochs {cfg.epochs}: the run of --resume {path} is {saved[0]['epochs']} epochs long; a "
                         f"resumed run can train longer, not shorter (--max_steps stops it early)")
    if "out_dir" not in given:  # the run goes on where its checkpoint is, wherever the folder has moved since
        cfg = replace(cfg, out_dir=os.path.dirname(path) or ".")
    return [cfg, dcfg, mcfg]


# -----------------------------------------------------------------------------
# the run


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    configs = runtime.parse_config(argv, [TrainConfig, data.DataConfig, ModelConfig], preset, __doc__)
    if configs[0].resume:
        configs = resume_configs(configs, argv)
    env = runtime.setup_device(configs[0].device)
    try:
        to_build = check_inputs(*configs, env)  # every refusal comes here, before a file is written
        if configs[0].dry_run:
            print0("all inputs found" + "".join(f"; {note}" for note in to_build) + " (--dry_run: nothing written)")
            return {}
        return run(*configs, env)[0]
    finally:
        if env.ddp:
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# before the run: everything it needs, checked at once


def check_inputs(cfg: TrainConfig, dcfg: data.DataConfig, mcfg: ModelConfig, env: DeviceEnv) -> list[str]:
    """Everything that can be checked before anything is built, downloaded or written: the flags against each other
    and this machine, the checkpoint to resume, every file and model the run will read (local ones on disk, hub
    names in the Hugging Face cache, the hub asked once) and the out_dir. Raises one UsageError listing every
    problem, with what to do for each, on every rank (rank 0's list: it alone claims the out_dir). Returns what the
    run will build first (the synthetic world's toy models at the presets' paths)."""
    problems, to_build, shapes_run = [], [], dcfg.dataset == "shapes"

    def check(fn, *args) -> None:  # a function that raises UsageError: its message joins the list
        try:
            fn(*args)
        except UsageError as e:
            problems.append(str(e))

    # flags against each other and this machine (the device itself: runtime.setup_device)
    per_step = cfg.micro_batch * env.world_size
    if cfg.batch_size % per_step:
        problems.append(f"--batch_size {cfg.batch_size}: must be a multiple of micro_batch x processes = "
                        f"{cfg.micro_batch} x {env.world_size}; change --batch_size or --micro_batch")
    check(runtime.amp_dtype, env.device, cfg.dtype)
    if cfg.cache_visual and mcfg.backbone in qrnet.SWIN_SIZES:
        problems.append("--cache_visual: QRNet's visual branch depends on the expression, so it cannot be cached")
    for flag in ("train_split", "eval_split"):
        if getattr(cfg, flag) not in data.DATASETS[dcfg.dataset].splits:
            problems.append(f"--{flag} {getattr(cfg, flag)}: {dcfg.dataset} has no such split; valid: "
                            f"{', '.join(data.DATASETS[dcfg.dataset].splits)}")
    if shapes_run and cfg.train_split in shapes.SPLITS:  # a real split's size: data.missing_inputs reads no file
        flag = "shapes_train_size" if cfg.train_split == "train" else "shapes_eval_size"
        n = getattr(dcfg, flag) or shapes.SPLITS[cfg.train_split][1]
        if n < cfg.batch_size:
            problems.append(f"--{flag} {n}: fewer training samples than one batch (--batch_size {cfg.batch_size}); "
                            f"give at least {cfg.batch_size}, or a smaller --batch_size")
    if mcfg.text_init == "random" and mcfg.text_config is not None:  # a pretrained BERT's: read with it, below
        check(check_text_length, mcfg, mcfg.text_config.get("max_position_embeddings", 512))  # BERT's 512

    # what the run reads: every missing one, each with what to do (the README's download steps)
    if cfg.resume and cfg.teacher_trainable and cfg.distill != "none" and not os.path.isfile(cfg.resume + ".teacher"):
        problems.append(f"--resume {cfg.resume}: the trained teacher beside it ({cfg.resume}.teacher) is missing; "
                        f"copy it there with the checkpoint")
    models = [("text_encoder", mcfg.text_encoder, ["vocab.txt"] + ["config.json"] * (mcfg.text_init == "pretrained"))]
    if cfg.distill != "none":
        models.append(("teacher", cfg.teacher, ["config.json"]))
    for flag, name, files in models:
        if shapes_run and name in toy.TOY_PATHS[flag] and not os.path.exists(name):
            to_build.append(f"the synthetic world's {'vocabulary' if flag == 'text_encoder' else 'toy CLIP'} will "
                            f"be built at {name}")
            continue
        why = next((w for w in (runtime.find_pretrained(name, f) for f in files) if w), None)
        if why:
            toy_how = toy.not_built_here(flag, name, mcfg, dcfg, cfg.toy_teacher_steps) if shapes_run else None
            how = (f"where the hub is reachable, `hf download {name}` fills the cache (copy it, and point HF_HOME at "
                   f"the copy), or save_pretrained it into a folder and pass that (README)" +
                   (f"; if it is a path: {toy_how}" if toy_how else "") if runtime.is_hub_name(name) else
                   toy_how or f"give a folder that holds {' and '.join(files)} (or a hub name)")
            problems.append(f"--{flag} {name}: {why}; {how}")
    if mcfg.text_init == "pretrained" and not any(f"--text_encoder {mcfg.text_encoder}:" in p for p in problems):
        with contextlib.suppress(OSError):  # on disk or in the cache: its position table, read without the hub
            bert = BertConfig.from_pretrained(mcfg.text_encoder, local_files_only=True)
            check(check_text_length, mcfg, bert.max_position_embeddings)
    if not cfg.resume:  # a resumed run takes every weight from its checkpoint
        if mcfg.visual_init in ("detr", "mask_rcnn"):
            check(interop.official_visual_checkpoint, mcfg.visual_init, mcfg.backbone,
                  data.DATASETS[dcfg.dataset].detr, cfg.checkpoint_dir)
        elif mcfg.visual_init not in ("random", "imagenet") and not os.path.isfile(mcfg.visual_init):
            if shapes_run and mcfg.visual_init in toy.TOY_PATHS["visual_init"]:
                to_build.append(f"the synthetic world's toy DETR will be built at {mcfg.visual_init}")
            else:
                how = toy.not_built_here("visual_init", mcfg.visual_init, mcfg, dcfg, 0) if shapes_run else None
                problems.append(f"--visual_init {mcfg.visual_init}: no such file; " + (how or "give a DETR, TransVG, "
                                "QRNet or Mask R-CNN checkpoint, or random (or imagenet for a ResNet)"))
    splits = {cfg.train_split, cfg.eval_split, *(data.DATASETS[dcfg.dataset].eval_splits if cfg.final_eval else ())}
    problems += data.missing_inputs(dcfg, [s for s in data.DATASETS[dcfg.dataset].splits if s in splits])
    if shapes_run and not problems:  # toy models already built: with this run's settings?
        check(toy.check_world_files, mcfg.text_encoder,
              *toy.toy_configs(mcfg, dcfg, None if cfg.distill == "none" else cfg.teacher, cfg.toy_teacher_steps,
                               cfg.toy_detr_steps))
    if env.is_master:  # where it writes: rank 0 alone looks, as it alone will lock it
        check(runtime.check_run_dir, cfg.out_dir, cfg.resume, cfg.overwrite)
    if env.ddp:
        shared = [problems]
        dist.broadcast_object_list(shared, src=0)
        problems = shared[0]
    if len(problems) == 1:
        raise UsageError(problems[0])
    if problems:
        raise UsageError(f"{len(problems)} problems, found before anything was built or written:\n" +
                         "\n".join(f"  - {p}" for p in problems) + "\nFix them and run again (--dry_run checks only).")
    return to_build


# -----------------------------------------------------------------------------
# the run


def run(cfg: TrainConfig, dcfg: data.DataConfig, mcfg: ModelConfig, env: DeviceEnv
        ) -> tuple[dict[str, float], GroundingModel]:
    """train() in a run folder of its own: claimed and locked first, released at the end whatever happens."""
    out_dir, lock = runtime.claim_run_dir(cfg.out_dir, os.path.join("out", dcfg.dataset), cfg.resume,
                                          cfg.overwrite, env)
    cfg = replace(cfg, out_dir=out_dir)
    try:
        return train(cfg, dcfg, mcfg, env)
    finally:
        if lock is not None:
            lock.close()


def train(cfg: TrainConfig, dcfg: data.DataConfig, mcfg: ModelConfig, env: DeviceEnv
          ) -> tuple[dict[str, float], GroundingModel]:
    """The training run; returns the final metrics and the trained (unwrapped) student."""
    # config: everything implicit is resolved here, once; `configs` is what every checkpoint holds
    if dcfg.dataset == "shapes":
        toy.prepare_world(mcfg, dcfg, None if cfg.distill == "none" else cfg.teacher, cfg.toy_teacher_steps,
                          cfg.toy_detr_steps, env)
    tokenizer = data.load_tokenizer(mcfg.text_encoder)
    cfg, mcfg = resolve(cfg, dcfg, mcfg, len(tokenizer))
    configs = {"train_config": asdict(cfg), "data_config": asdict(dcfg), "model_config": asdict(mcfg)}
    per_step = cfg.micro_batch * env.world_size
    if cfg.batch_size % per_step:  # check_inputs says so first; here for any other caller of run()
        raise UsageError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch x world_size = {per_step}")
    accum = cfg.batch_size // per_step

    # data
    sizes = {"imsize": mcfg.imsize, "max_query_len": mcfg.max_query_len}
    train_set = runtime.EpochSeeded(data.make_dataset(dcfg, cfg.train_split, tokenizer, train=cfg.augment, **sizes),
                                    cfg.seed)
    eval_set = data.make_dataset(dcfg, cfg.eval_split, tokenizer, train=False, **sizes)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{dcfg.dataset}/{cfg.train_split} has {len(train_set)} samples, fewer than one batch "
                         f"(--batch_size {cfg.batch_size})")
    total_steps = min(cfg.max_steps or cfg.epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)

    # model: the same init on every rank (DDP also broadcasts rank 0's weights). A resumed run takes every weight
    # from its checkpoint, so it builds the branches at random instead of fetching BERT and DETR again.
    torch.manual_seed(cfg.seed)
    model = GroundingModel(replace(mcfg, text_init="random", visual_init="random") if cfg.resume else mcfg)
    model = model.to(env.device)
    torch.manual_seed(cfg.seed + env.rank)  # from here on (dropout) every rank has its own stream
    random.seed(cfg.seed + env.rank)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.cache_visual:  # a frozen visual branch: the optimizer never sees it (QRNet's reads the text: no)
        if model.qrnet:
            raise UsageError("--cache_visual: QRNet's visual branch depends on the expression, so it cannot be cached")
        for name, p in model.named_parameters():
            p.requires_grad_(p.requires_grad and not name.startswith(toy.VISUAL))
    print0(f"student parameters: {count_parameters(model)}")

    # teacher, optimizer, resume (weights, optimizer, counters and RNG; the lr follows from the step)
    teacher = None
    if cfg.distill != "none":
        teacher = CLIPTeacher(cfg.teacher, device=env.device, trainable=cfg.teacher_trainable,
                              dtype=runtime.amp_dtype(env.device, cfg.dtype) or torch.float32,
                              text_cache_size=cfg.teacher_text_cache, init=cfg.teacher_init)
    cv, ct = model.distill_widths(cfg.distill_loc)  # the teacher runs only the towers the modality needs
    widths = (cv if cfg.distill_modality != "text" else None, ct if cfg.distill_modality != "image" else None)
    optimizer = torch.optim.AdamW(param_groups(model, teacher, cfg), weight_decay=cfg.weight_decay,
                                  fused=env.device.type == "cuda")
    amp = runtime.amp_dtype(env.device, cfg.dtype)  # None = fp32
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)  # fp16 only: bf16 needs no loss scaling
    step, best, start = 0, -1.0, time.time()
    if cfg.resume:
        ckpt = runtime.load_training_state(cfg.resume, model, optimizer, scaler, env,
                                           sidecar=teacher.model if teacher is not None and teacher.trainable else None)
        step, best = ckpt["step"], ckpt["best_metric"]
        print0(f"resumed from {cfg.resume} at step {step} (epoch {step // steps_per_epoch}), best {best:.2f}")
        if cfg.epochs != ckpt["train_config"]["epochs"]:
            print0(f"--epochs {cfg.epochs}: the run, {ckpt['train_config']['epochs']} epochs long so far, continues "
                   f"to step {total_steps} with the lr schedule of {cfg.epochs} epochs ({cfg.lr_schedule})")
    if cfg.cache_visual:  # after the resume: its weights are the ones to cache
        train_set = runtime.EpochSeeded(toy.CachedVisual(train_set.dataset, model, teacher, widths, env.device),
                                        cfg.seed)
    raw_model = model  # unwrapped and uncompiled: what checkpoints hold; save(name, step, best) writes them
    save = functools.partial(save_checkpoint, model=raw_model, optimizer=optimizer, scaler=scaler, teacher=teacher,
                             configs=configs, steps_per_epoch=steps_per_epoch, cfg=cfg, env=env)
    if cfg.compile:
        model = torch.compile(model)
    # evaluation needs no DDP (its forward would broadcast buffers, a collective, per batch): score(dataset) -> metrics
    score = functools.partial(evaluate, model, device=env.device, batch_size=cfg.eval_batch,
                              num_workers=min(cfg.num_workers, 2), dtype=cfg.dtype)
    if env.ddp:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    run_info = json.dumps({**configs, "world_size": env.world_size, "grad_accum": accum}, indent=1)
    print0(run_info)
    print0(f"{dcfg.dataset}: {len(train_set)} train samples, {steps_per_epoch} steps/epoch, {total_steps} steps; "
           f"global batch {cfg.batch_size} = micro-batch {cfg.micro_batch} x {env.world_size} devices x {accum} "
           f"accumulation steps")
    if env.is_master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            f.write(run_info)

    # loop: an epoch at a time (one data order each), evaluating every epoch or every eval_every steps
    metrics = {}
    while step < total_steps:
        epoch, batches = step // steps_per_epoch, epoch_batches(train_set, step, steps_per_epoch, cfg, env)
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        bar = tqdm(total=epoch_end - step, desc=f"epoch {epoch}", disable=not env.is_master, dynamic_ncols=True)
        sums, done, t0 = {}, 0, time.time()
        while step < epoch_end:
            factor = lr_factor(step, steps_per_epoch, cfg)
            terms = optimizer_step(model, teacher, widths, batches, optimizer, scaler, factor, accum, cfg, env, step)
            step, done = step + 1, done + 1
            sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in terms.items()}, "lr": f"{cfg.lr * factor:.1e}",
                             "img/s": f"{done * cfg.batch_size / (time.time() - t0):.1f}"})
            if cfg.save_every and step % cfg.save_every == 0 and step != epoch_end:  # a crash loses minutes
                save("last.pt", step, best)
            if eval_due(step, epoch_end, total_steps, cfg.eval_every):
                runtime.sync_buffers(raw_model, env)
                metrics = score(eval_set)[0]
                if metrics["acc@0.5"] > best:
                    best = metrics["acc@0.5"]
                    save("best.pt", step, best)
                print0(f"step {step}: {cfg.eval_split} Acc@0.5 {metrics['acc@0.5']:.2f} (best {best:.2f}), "
                       f"Acc@0.75 {metrics['acc@0.75']:.2f}, mIoU {metrics['miou']:.3f}" +
                       "".join(f"; {name} Acc@0.5 {m['acc@0.5']:.2f}" for name, m in metrics.get("slices", {}).items()))
                metrics = {**metrics, "step": step}
        bar.close()
        save("last.pt", step, best)
        if env.is_master:
            line = {"epoch": epoch, "step": step, "lr": cfg.lr * factor,
                    **{f"train_{k}": v / done for k, v in sums.items()},
                    **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()},
                    "images_per_s": done * cfg.batch_size / (time.time() - t0), "elapsed_s": time.time() - start}
            with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")

    # the final model on every split papers report for this dataset (val, testA, testB for RefCOCO)
    results = {}
    if cfg.final_eval:
        for split in data.DATASETS[dcfg.dataset].eval_splits:
            dataset = eval_set if split == cfg.eval_split else data.make_dataset(dcfg, split, tokenizer, train=False,
                                                                                 **sizes)
            results[split] = score(dataset)[0]
        print_table(results)
    final = {"step": step, "best_acc@0.5": best,
             **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items() if k != "step"},
             **{f"{split}_{k}": v for split, m in results.items() for k, v in m.items()}}
    return final, raw_model


if __name__ == "__main__":
    runtime.cli(main)
