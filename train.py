"""Train EpmVG: the TransVG (or QRNet) student with the CLIP distillation loss (paper eq. 8), on CPU, one GPU or many.

    python train.py                                              # synthetic world, laptop CPU, minutes
    python train.py --dataset refcoco                            # one GPU: the paper's recipe, grad accumulation
    torchrun --nproc_per_node=8 train.py --dataset refcoco       # the paper's 8 GPUs x 8 images
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --dataset refcoco
    python train.py --dataset refcoco --distill none             # the TransVG baseline ("w/o" rows)
    torchrun --nproc_per_node=8 train.py --dataset refcoco --backbone swin_s_qrnet   # QRNet as the student
    python train.py --resume out/refcoco/last.pt                 # continue exactly where it stopped
    python train.py --resume out/refcoco/last.pt --epochs 120    # train a run longer (the lr follows 120 epochs)
    python train.py --dataset refcoco --dry_run                  # only check that every input is in place

Every field of TrainConfig, data.DataConfig and model.ModelConfig is a flag (--help lists them with the values that
will run: the recipe of --dataset and --backbone, machinery/recipes.py, under the command line). Every mistake is said
before anything is written (machinery/preflight.py). optimizer_step is eq. 8 on each micro-batch: the student's
forward, the teacher's targets, the loss; train() reads top to bottom. Checkpoints hold the student only.

References: EpmVG paper sec. 4.2; TransVG (github.com/djiajunustc/TransVG @ c862427) train.py and engine.py; QRNet
(github.com/LukeForeverYoung/QRNet @ 6aaa23c) train.py and its scripts.
"""

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
from clip_teacher import DEFAULT_TEACHER, CLIPTeacher
from evaluate import evaluate, print_table
from losses import BOX_LOSSES, DISTILL_LOSSES, MODALITIES, distill_loss, total_loss
from machinery import checkpoints, interop, runtime
from machinery.cache import CachedVisual, freeze_visual
from machinery.flags import check_fields, cli, parse_config
from machinery.preflight import check_inputs, check_one_batch
from machinery.recipes import recipe, resolve
from machinery.run_folders import claim_run_dir
from machinery.runtime import DTYPE_NAMES, DeviceEnv, EpochSeeded, print0
from model import BUILT_IN_VISUAL_INITS, LOCATIONS, GroundingModel, ModelConfig, count_parameters

# -----------------------------------------------------------------------------
# config: how the student is trained (TrainConfig's defaults are the paper's TransVG recipe on RefCOCO)


@dataclass
class TrainConfig:
    train_split: str = "train"  # split to train on
    eval_split: str = "val"  # split for model selection during training (best.pt)
    augment: bool = True  # TransVG's train augmentation (scale, crop, colour, flip with word swap, translate)
    epochs: int = 90  # paper: 90 (180 for RefCOCO+)
    lr_drop: int = 60  # every lr x0.1 each lr_drop epochs, as StepLR (paper: 60; 120 for RefCOCO+)
    lr_schedule: str = "step"  # step (x0.1 every lr_drop epochs: TransVG's and QRNet's StepLR) or cosine (to 0)
    batch_size: int = 64  # global images per optimizer step (paper: 8 GPUs x 8)
    micro_batch: int = 8  # images per device per forward; gradient accumulation makes up batch_size
    lr: float = 1e-4  # fusion transformer, projections, [REG], position table, box head (QRNet: + QD-ATT, scales)
    lr_visual: float = 1e-5  # ResNet and DETR encoder; QRNet: Swin and the neck's lateral convs (+ a trainable CLIP)
    lr_text: float = 1e-5  # BERT
    weight_decay: float = 1e-4  # AdamW, on every parameter like TransVG
    warmup_steps: int = 0  # linear lr warmup in optimizer steps (TransVG: none)
    clip_grad: float = 0.0  # max gradient norm, 0 = off (TransVG: off)
    max_steps: int = 0  # stop after this many optimizer steps in all (0 = the whole schedule)
    box_loss: str = "l1"  # losses.BOX_LOSSES: l1 (TransVG's code, the paper's baselines'), smooth_l1 (eq. 8)
    giou_weight: float = 1.0  # lambda of eq. 8
    distill: str = "cos"  # losses.DISTILL_LOSSES: cos (eq. 7), l1 (Table 3 #2); or none (the TransVG baseline)
    distill_modality: str = "both"  # both, image (Table 3 #3) or text (Table 3 #4)
    distill_loc: str = "loc1"  # model.LOCATIONS (Table 4): loc1 (fusion output) ... loc4 (CNN / BERT embeddings)
    alpha: float = 1.5  # weight of the image term
    beta: float = 2.0  # weight of the text term
    teacher: str = DEFAULT_TEACHER  # CLIP hub name or local directory
    teacher_init: str = "pretrained"  # pretrained, or random: the teacher's architecture untrained (the control)
    teacher_trainable: bool = False  # Table 5 "unfrozen": CLIP trains at lr_visual with the distillation grads
    teacher_text_cache: int = 0  # frozen teacher: keep this many text embeddings, keyed on the exact expression
    cache_visual: bool = False  # frozen visual branch: its tokens and teacher targets once per sample (machinery/cache)
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
    dry_run: bool = False  # only check the flags and that every input is in place (preflight); write nothing
    qrnet_recipe: str = "qrnet"  # a QRNet student's on a benchmark: qrnet (QRNet's own, 180 epochs) or paper (TransVG's)

    CHOICES = {"lr_schedule": ("step", "cosine"), "box_loss": tuple(BOX_LOSSES), "distill": (*DISTILL_LOSSES, "none"),
               "distill_modality": MODALITIES, "distill_loc": tuple(LOCATIONS), "dtype": DTYPE_NAMES,
               "teacher_init": ("pretrained", "random"), "qrnet_recipe": ("qrnet", "paper")}

    def __post_init__(self) -> None:  # one flag's value, when the flags are read; across flags: machinery/preflight.py
        check_fields(self, [
            *[(k, getattr(self, k) >= 1, ">= 1") for k in ("epochs", "lr_drop", "batch_size", "micro_batch",
                                                            "eval_batch")],
            *[(k, getattr(self, k) >= 0, ">= 0") for k in (
                "lr_visual", "lr_text", "weight_decay", "warmup_steps", "clip_grad", "max_steps",
                "giou_weight", "alpha", "beta", "teacher_text_cache", "eval_every", "save_every", "num_workers")],
            ("lr", self.lr > 0, "> 0"), runtime.device_rule(self.device),
            ("teacher_text_cache", not (self.teacher_text_cache and self.teacher_trainable),
             "0 with --teacher_trainable (the cache would go stale)"),
            ("overwrite", not (self.overwrite and self.resume), "not both --overwrite and --resume")])


def read_flags(argv: list[str] | None) -> list:
    """[TrainConfig, DataConfig, ModelConfig, WorldConfig (None on a benchmark)] from the command line; with --resume,
    the checkpoint's, with the flags that may change on top."""
    argv = sys.argv[1:] if argv is None else argv
    configs = parse_config(argv, [TrainConfig, data.DataConfig, ModelConfig], recipe, __doc__)
    configs += [None] * (4 - len(configs))
    return checkpoints.resume_configs(configs, argv, configs[0].resume) if configs[0].resume else configs


# -----------------------------------------------------------------------------
# the lr schedule and the parameter groups


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of every base lr at an optimizer step: linear warmup, then x0.1 every lr_drop epochs (StepLR's rule,
    which TransVG's and QRNet's train.py build: 180 epochs with lr_drop 60 drop at 60 and 120) or a cosine to 0 at the
    end of the last epoch (--max_steps stops early, it does not squeeze the schedule). A pure function of the step, so
    resuming needs no scheduler state."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * step / (cfg.epochs * steps_per_epoch)))
    return warm * 0.1 ** (step // (cfg.lr_drop * steps_per_epoch))


def param_groups(model: GroundingModel, teacher: CLIPTeacher | None, cfg: TrainConfig) -> list[dict]:
    """TransVG's groups: visual branch and BERT at 1e-5, everything new at 1e-4; a trainable teacher joins the
    visual lr (paper Table 5). Weight decay on every parameter, biases and norms included, as TransVG does.
    QRNet's: Swin, its stage norms, the neck's lateral convs and BERT at 1e-5; every QD-ATT (backbone and neck), the
    scale embeddings and the fusion at 1e-4."""
    groups = {"fusion": [], "visual": [], "text": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = ("fusion" if ".qdatt." in name or name == "visual.scale_embed" else  # QRNet's: new, at 1e-4
                    "visual" if name.startswith("visual.") else
                    "text" if name.startswith("text_encoder.") else "fusion")
            groups[kind].append(p)
    base = {"fusion": cfg.lr, "visual": cfg.lr_visual, "text": cfg.lr_text}
    out = [{"name": k, "params": v, "base_lr": base[k], "lr": base[k]} for k, v in groups.items()]
    if teacher is not None and cfg.teacher_trainable:
        out.append({"name": "teacher", "params": list(teacher.parameters()), "base_lr": cfg.lr_visual,
                    "lr": cfg.lr_visual})
    return out


# -----------------------------------------------------------------------------
# one optimizer step: eq. 8


@dataclass
class Run:
    """What the steps, evaluations and checkpoints of a training run read, set up once by setup()."""
    cfg: TrainConfig
    env: DeviceEnv
    model: torch.nn.Module  # what the step calls: the student, compiled and/or DDP-wrapped
    raw_model: GroundingModel  # unwrapped and uncompiled: what checkpoints hold and evaluation runs
    teacher: CLIPTeacher | None
    widths: tuple[int | None, int | None]  # what the teacher's embeddings are pooled to (None: not distilled)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_set: EpochSeeded
    eval_set: data.GroundingDataset
    tokenizer: object  # BERT's, which every split is tokenised with
    configs: dict  # the resolved configs, as every checkpoint holds them
    steps_per_epoch: int
    total_steps: int
    start: float  # time.time() when the run began

    @property
    def accum(self) -> int:  # gradient accumulation: micro-batches per optimizer step on each device
        return self.cfg.batch_size // (self.cfg.micro_batch * self.env.world_size)


def optimizer_step(run: Run, batches, step: int) -> dict[str, float]:
    """Eq. 8 and backward on run.accum micro-batches (gradients all-reduced on the last one only), then the update at
    the lr of this step. Returns each loss term's mean over the global batch; a non-finite one stops the run before
    the update, on every rank at once."""
    cfg, env, teacher, optimizer, scaler = run.cfg, run.env, run.teacher, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, run.steps_per_epoch, cfg)
    sums = {}
    for micro in range(run.accum):
        batch = runtime.to_device(next(batches), env.device, cfg.channels_last)
        with run.model.no_sync() if env.ddp and micro < run.accum - 1 else contextlib.nullcontext():
            with runtime.autocast_for(env.device, cfg.dtype):
                # the student; with --cache_visual its frozen visual branch's outputs ride in the batch
                out = run.model(batch["image"], batch["img_is_pad"], batch["input_ids"], batch["attention_mask"],
                                batch.get("visual"))
                distill_terms = {}
                if teacher is not None:
                    # CLIP's [DIE] and [DTE] of the same canvas and expression, pooled to the student's widths (eq.
                    # 5-6); with --cache_visual a frozen teacher's were computed once per sample and ride in the batch
                    targets = batch["teacher_targets"] if "teacher_targets" in batch else teacher.targets(
                        data.unnormalise(batch["image"]), batch["text"], run.widths)
                    distill_terms = distill_loss(out["distill"][cfg.distill_loc], targets, cfg.distill,
                                                 cfg.distill_modality, cfg.alpha, cfg.beta)  # eq. 7
                loss, terms = total_loss(out["pred_boxes"], batch["target"], cfg.box_loss, cfg.giou_weight,
                                         distill_terms)  # eq. 8
            scaler.scale(loss / run.accum).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v.detach() / run.accum
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
# an epoch, and when to evaluate


def eval_due(step: int, epoch_end: int, total_steps: int, eval_every: int) -> bool:
    """After optimizer step `step`: every eval_every steps and at the very end, or (eval_every = 0) every epoch."""
    return step % eval_every == 0 or step == total_steps if eval_every else step == epoch_end


def train_epoch(run: Run, step: int, best: float, metrics: dict) -> tuple[int, float, dict]:
    """Optimizer steps from `step` to the end of its epoch (or of the run), saving and evaluating when due, then
    last.pt and one line of log.jsonl. Returns (step, best val Acc@0.5, the latest evaluation's metrics)."""
    cfg, env = run.cfg, run.env
    epoch = step // run.steps_per_epoch
    batches = runtime.epoch_batches(run.train_set, step, run.steps_per_epoch, cfg, env)
    epoch_end = min((epoch + 1) * run.steps_per_epoch, run.total_steps)
    bar = tqdm(total=epoch_end - step, desc=f"epoch {epoch}", disable=not env.is_master, dynamic_ncols=True)
    sums, done, t0 = {}, 0, time.time()
    while step < epoch_end:
        terms = optimizer_step(run, batches, step)
        step, done = step + 1, done + 1
        sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
        lr = run.optimizer.param_groups[0]["lr"]  # the fusion group's: cfg.lr x the schedule's factor
        bar.update(1)
        bar.set_postfix({**{k: f"{v:.3f}" for k, v in terms.items()}, "lr": f"{lr:.1e}",
                         "img/s": f"{done * cfg.batch_size / (time.time() - t0):.1f}"})
        if cfg.save_every and step % cfg.save_every == 0 and step != epoch_end:  # a crash loses minutes
            checkpoints.save_run(run, "last.pt", step, best)
        if eval_due(step, epoch_end, run.total_steps, cfg.eval_every):
            runtime.sync_buffers(run.raw_model, env)
            metrics = score(run, run.eval_set)
            if metrics["acc@0.5"] > best:
                best = metrics["acc@0.5"]
                checkpoints.save_run(run, "best.pt", step, best)
            print0(f"step {step}: {cfg.eval_split} Acc@0.5 {metrics['acc@0.5']:.2f} (best {best:.2f}), "
                   f"Acc@0.75 {metrics['acc@0.75']:.2f}, mIoU {metrics['miou']:.3f}" +
                   "".join(f"; {name} Acc@0.5 {m['acc@0.5']:.2f}" for name, m in metrics.get("slices", {}).items()))
            metrics = {**metrics, "step": step}
    bar.close()
    checkpoints.save_run(run, "last.pt", step, best)
    if env.is_master:
        line = {"epoch": epoch, "step": step, "lr": lr, **{f"train_{k}": v / done for k, v in sums.items()},
                **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()},
                "images_per_s": done * cfg.batch_size / (time.time() - t0), "elapsed_s": time.time() - run.start}
        with open(os.path.join(cfg.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
    return step, best, metrics


def score(run: Run, dataset: data.GroundingDataset) -> dict:
    """evaluate() on the student without its DDP wrapper (whose forward would broadcast buffers, a collective, per
    batch), compiled if it is."""
    model = run.model.module if run.env.ddp else run.model
    return evaluate(model, dataset, run.cfg.eval_batch, min(run.cfg.num_workers, 2), dtype=run.cfg.dtype)[0]


# -----------------------------------------------------------------------------
# the run


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg, dcfg, mcfg, wcfg = read_flags(argv)
    env = runtime.setup_device(cfg.device)
    try:
        to_build = check_inputs(cfg, dcfg, mcfg, wcfg, env)  # every refusal comes here, before a file is written
        if cfg.dry_run:
            print0("all inputs found" + "".join(f"; {note}" for note in to_build) + " (--dry_run: nothing written)")
            return {}
        out_dir, lock = claim_run_dir(cfg.out_dir, os.path.join("out", dcfg.dataset), cfg.resume, cfg.overwrite, env)
        try:  # the folder is this run's, locked, until it ends, whatever happens
            return train(replace(cfg, out_dir=out_dir), dcfg, mcfg, wcfg, env)[0]
        finally:
            if lock is not None:
                lock.close()
    finally:
        if env.ddp:
            dist.destroy_process_group()


def train(cfg: TrainConfig, dcfg: data.DataConfig, mcfg: ModelConfig, wcfg, env: DeviceEnv
          ) -> tuple[dict[str, float], GroundingModel]:
    """The training run in cfg.out_dir (wcfg: the synthetic world's settings, None on a benchmark); returns the final
    metrics and the trained (unwrapped) student."""
    run = setup(cfg, dcfg, mcfg, wcfg, env)
    step, best = checkpoints.resume_run(run) if cfg.resume else (0, -1.0)
    if cfg.cache_visual:  # the frozen branch's tokens and teacher's targets, from the weights as they now are
        run.train_set = EpochSeeded(CachedVisual(run.train_set.dataset, run.raw_model, run.teacher, run.widths,
                                                 env.device), cfg.seed)
    if cfg.compile:
        run.model = torch.compile(run.model)
    if env.ddp:
        run.model = DistributedDataParallel(run.model, device_ids=[env.local_rank] if env.device.type == "cuda"
                                            else None)
    describe(run)

    # loop: an epoch at a time (one data order each), evaluating every epoch or every eval_every steps
    metrics = {}
    while step < run.total_steps:
        step, best, metrics = train_epoch(run, step, best, metrics)

    # the final model on every split papers report for this dataset (val, testA, testB for RefCOCO)
    results = {}
    if cfg.final_eval:
        for split in data.DATASETS[dcfg.dataset].eval_splits:
            if split == cfg.eval_split and metrics.get("step") == step:  # the loop has just scored these weights
                results[split] = {k: v for k, v in metrics.items() if k != "step"}
                continue
            dataset = run.eval_set if split == cfg.eval_split else data.make_dataset(
                dcfg, split, run.tokenizer, train=False, imsize=mcfg.imsize, max_query_len=mcfg.max_query_len,
                world=wcfg)
            results[split] = score(run, dataset)
        print0(f"{dcfg.dataset}, the final weights (step {step}); best.pt holds the best val epoch's, which a paper's "
               f"table compares with (python evaluate.py --ckpt {os.path.join(cfg.out_dir, 'best.pt')})")
        print_table(results)
    final = {"step": step, "best_acc@0.5": best,
             **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items() if k != "step"},
             **{f"{split}_{k}": v for split, m in results.items() for k, v in m.items()}}
    return final, run.raw_model


def setup(cfg: TrainConfig, dcfg: data.DataConfig, mcfg: ModelConfig, wcfg, env: DeviceEnv) -> Run:
    """Everything the loop reads, in order: the world's toy models (first use), the resolved configs, the data, the
    student, the teacher and the optimizer."""
    if wcfg is not None:  # the synthetic world's vocabulary, toy CLIP, toy DETR or Swin, made once
        from world import prepare
        prepare.prepare(prepare.needed(cfg, mcfg), wcfg, None if cfg.distill == "none" else cfg.teacher, env)
    tokenizer = data.load_tokenizer(mcfg.text_encoder)
    mcfg = resolve(dcfg, mcfg, cfg.checkpoint_dir, len(tokenizer))
    configs = {"train_config": asdict(cfg), "data_config": asdict(dcfg), "model_config": asdict(mcfg),
               "world_config": None if wcfg is None else asdict(wcfg)}

    # data: the training set's augmentation is a function of (seed, epoch, index) (runtime.EpochSeeded)
    sizes = {"imsize": mcfg.imsize, "max_query_len": mcfg.max_query_len, "world": wcfg}
    train_set = EpochSeeded(data.make_dataset(dcfg, cfg.train_split, tokenizer, train=cfg.augment, **sizes), cfg.seed)
    eval_set = data.make_dataset(dcfg, cfg.eval_split, tokenizer, train=False, **sizes)
    check_one_batch(len(train_set), cfg.batch_size, f"{dcfg.dataset} {cfg.train_split}: {len(train_set)} samples")
    steps_per_epoch = len(train_set) // cfg.batch_size
    total_steps = min(cfg.max_steps or cfg.epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)

    # the student, the teacher (never part of the student: stored by name), what the teacher's targets are pooled to
    model, amp = build_student(mcfg, cfg, env), runtime.amp_dtype(env.device, cfg.dtype)  # amp None: fp32
    teacher = None if cfg.distill == "none" else CLIPTeacher(
        cfg.teacher, device=env.device, trainable=cfg.teacher_trainable, init=cfg.teacher_init,
        dtype=amp or torch.float32, text_cache_size=cfg.teacher_text_cache)
    cv, ct = model.distill_widths(cfg.distill_loc)  # the teacher runs only the towers the modality needs
    widths = (cv if cfg.distill_modality != "text" else None, ct if cfg.distill_modality != "image" else None)

    # optimizer; a resumed run restores weights, optimizer, counters and RNG (the lr follows from the step)
    # fused on CUDA; elsewhere foreach, one op over every parameter instead of a loop over them (CPU's default): the
    # same numbers in half the time (~2 ms of a laptop step)
    optimizer = torch.optim.AdamW(param_groups(model, teacher, cfg), weight_decay=cfg.weight_decay,
                                  **{"fused": True} if env.device.type == "cuda" else {"foreach": True})
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)  # fp16 only: bf16 needs no loss scaling
    return Run(cfg, env, model, model, teacher, widths, optimizer, scaler, train_set, eval_set, tokenizer, configs,
               steps_per_epoch, total_steps, time.time())


def build_student(mcfg: ModelConfig, cfg: TrainConfig, env: DeviceEnv) -> GroundingModel:
    """The student on the device, the same init on every rank (DDP also broadcasts rank 0's weights), its visual branch
    from --visual_init's file if it names one; then each rank seeds its own stream (dropout). A resumed run takes every
    weight from its checkpoint, so it builds the branches at random instead of fetching BERT and DETR again. With
    --cache_visual its visual branch is frozen, before the optimizer sees it."""
    torch.manual_seed(cfg.seed)
    model = GroundingModel(replace(mcfg, text_init="random", visual_init="random") if cfg.resume else mcfg)
    if not cfg.resume and mcfg.visual_init not in BUILT_IN_VISUAL_INITS:
        interop.load_visual_checkpoint(model, mcfg.visual_init)  # a DETR, TransVG, QRNet or Mask R-CNN file
    model = model.to(env.device)
    torch.manual_seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.cache_visual:
        freeze_visual(model)
    print0(f"student parameters: {count_parameters(model)}")
    return model


def describe(run: Run) -> None:
    """Print the resolved configs and the run's shape; rank 0 writes them to out_dir/config.json."""
    info = json.dumps({**run.configs, "world_size": run.env.world_size, "grad_accum": run.accum}, indent=1)
    print0(f"{info}\n{run.configs['data_config']['dataset']}: {len(run.train_set)} train samples, "
           f"{run.steps_per_epoch} steps/epoch, {run.total_steps} steps; global batch {run.cfg.batch_size} = "
           f"micro-batch {run.cfg.micro_batch} x {run.env.world_size} devices x {run.accum} accumulation steps")
    if run.env.is_master:
        checkpoints.write_atomic(os.path.join(run.cfg.out_dir, "config.json"), lambda tmp: Path(tmp).write_text(info))


if __name__ == "__main__":
    cli(main)
