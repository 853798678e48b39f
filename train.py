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

Every field of TrainConfig, DataConfig and ModelConfig is a flag (--key value or --key=value; --help lists them with
the values that will run). The recipes per dataset and student are in config.py; flags override them. Before
anything is built, downloaded or written, preflight.check_inputs checks every flag and input the run needs and
reports all that are wrong in one message (exit status 2). train() reads top to bottom: config, data, student,
teacher, optimizer, resume, loop; optimizer_step is eq. 8 on each micro-batch: the student's forward, the teacher's
targets, the loss. Checkpoints are plain data (weights_only=True loads them), hold the student only (the teacher is
stored by name), and are written atomically by rank 0.

References: EpmVG paper sec. 4.2; TransVG (github.com/djiajunustc/TransVG @ c862427) train.py and engine.py.
"""

import contextlib
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
from tqdm import tqdm

import data
import files
import interop
import precompute
import runtime
import world
from clip_teacher import CLIPTeacher
from config import FORMAT_VERSION, TrainConfig, defaults, resume_configs
from evaluate import evaluate, print_table
from flags import UsageError, cli, parse_config
from losses import distill_loss, total_loss
from model import OFFICIAL_VISUAL_INITS, GroundingModel, ModelConfig, count_parameters, resolve_text_config
from preflight import check_inputs
from runtime import DeviceEnv, EpochSeeded, print0

# -----------------------------------------------------------------------------
# what the flags leave implicit, the lr schedule, the parameter groups


def resolve(dcfg: data.DataConfig, mcfg: ModelConfig, checkpoint_dir: str, vocab_size: int) -> ModelConfig:
    """Fill what the flags leave implicit, once, before anything is built: the DETR or Mask R-CNN checkpoint path and
    BERT's full config (so a checkpoint rebuilds it offline). What this returns is what checkpoints hold."""
    if mcfg.visual_init in OFFICIAL_VISUAL_INITS:
        mcfg = replace(mcfg, visual_init=interop.official_visual_checkpoint(
            mcfg.visual_init, mcfg.backbone, data.DATASETS[dcfg.dataset].detr, checkpoint_dir))
    return resolve_text_config(mcfg, vocab_size if mcfg.text_init == "random" else None)


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
    """What the steps, evaluations and checkpoints of a training run read, set up once by train()."""
    cfg: TrainConfig
    env: DeviceEnv
    model: torch.nn.Module  # what the step calls: the student, compiled and/or DDP-wrapped
    raw_model: GroundingModel  # unwrapped and uncompiled: what checkpoints hold and evaluation runs
    teacher: CLIPTeacher | None
    feed: precompute.OnTheFly | precompute.Precomputed  # what the student is fed, where the targets come from
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_set: EpochSeeded
    eval_set: data.GroundingDataset
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
    cfg, env, optimizer, scaler = run.cfg, run.env, run.optimizer, run.scaler
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, run.steps_per_epoch, cfg)
    sums = {}
    for micro in range(run.accum):
        batch = {k: v.to(env.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        with run.model.no_sync() if env.ddp and micro < run.accum - 1 else contextlib.nullcontext():
            with runtime.autocast_for(env.device, cfg.dtype):
                out = run.model(*run.feed.student_inputs(batch))  # the student
                distill_terms = {}
                if run.teacher is not None:  # the teacher's [DIE] and [DTE], pooled to the student's widths (eq. 5-7)
                    distill_terms = distill_loss(out["distill"][cfg.distill_loc], run.feed.teacher_targets(batch),
                                                 cfg.distill, cfg.distill_modality, cfg.alpha, cfg.beta)
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
    if run.teacher is not None and cfg.teacher_trainable and env.ddp:
        runtime.average_gradients(run.teacher.parameters(), env.world_size)  # the teacher is outside DDP
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
            save_checkpoint(run, "last.pt", step, best)
        if eval_due(step, epoch_end, run.total_steps, cfg.eval_every):
            runtime.sync_buffers(run.raw_model, env)
            metrics = score(run, run.eval_set)
            if metrics["acc@0.5"] > best:
                best = metrics["acc@0.5"]
                save_checkpoint(run, "best.pt", step, best)
            print0(f"step {step}: {cfg.eval_split} Acc@0.5 {metrics['acc@0.5']:.2f} (best {best:.2f}), "
                   f"Acc@0.75 {metrics['acc@0.75']:.2f}, mIoU {metrics['miou']:.3f}" +
                   "".join(f"; {name} Acc@0.5 {m['acc@0.5']:.2f}" for name, m in metrics.get("slices", {}).items()))
            metrics = {**metrics, "step": step}
    bar.close()
    save_checkpoint(run, "last.pt", step, best)
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
# checkpoints and resume


def save_checkpoint(run: Run, name: str, step: int, best: float) -> None:
    """out_dir/name with everything a resume needs (files.save_training_state), the configs, the teacher's name
    and hash (a trainable teacher's weights go beside it, name + ".teacher", never inside the student's)."""
    teacher, path = run.teacher, os.path.join(run.cfg.out_dir, name)
    teacher_id = None if teacher is None else {"name": teacher.name, "sha256": teacher.weights_sha256}
    files.save_training_state(path, run.raw_model, run.optimizer, run.scaler, run.env, {
        **run.configs, "step": step, "epoch": step // run.steps_per_epoch, "best_metric": best, "teacher": teacher_id,
        "format_version": FORMAT_VERSION})
    if teacher is not None and teacher.trainable and run.env.is_master:
        files.save_atomic({"model": teacher.model.state_dict()}, path + ".teacher")


# -----------------------------------------------------------------------------
# the run


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    configs = parse_config(argv, [TrainConfig, data.DataConfig, ModelConfig], defaults, __doc__)
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


def run(cfg: TrainConfig, dcfg: data.DataConfig, mcfg: ModelConfig, env: DeviceEnv
        ) -> tuple[dict[str, float], GroundingModel]:
    """train() in a run folder of its own: claimed and locked first, released at the end whatever happens."""
    out_dir, lock = files.claim_run_dir(cfg.out_dir, os.path.join("out", dcfg.dataset), cfg.resume, cfg.overwrite,
                                        env)
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
    if dcfg.dataset == "shapes":  # the synthetic world's vocabulary, toy CLIP, toy DETR or Swin, made once (world.py)
        world.prepare(world.needed(cfg, mcfg), dcfg, None if cfg.distill == "none" else cfg.teacher, env)
    tokenizer = data.load_tokenizer(mcfg.text_encoder)
    mcfg = resolve(dcfg, mcfg, cfg.checkpoint_dir, len(tokenizer))
    configs = {"train_config": asdict(cfg), "data_config": asdict(dcfg), "model_config": asdict(mcfg)}
    if cfg.batch_size % (cfg.micro_batch * env.world_size):  # check_inputs says so first; here for other callers
        raise UsageError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch x world_size = "
                         f"{cfg.micro_batch * env.world_size}")

    # data
    sizes = {"imsize": mcfg.imsize, "max_query_len": mcfg.max_query_len}
    train_set = EpochSeeded(data.make_dataset(dcfg, cfg.train_split, tokenizer, train=cfg.augment, **sizes), cfg.seed)
    eval_set = data.make_dataset(dcfg, cfg.eval_split, tokenizer, train=False, **sizes)
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"{dcfg.dataset}/{cfg.train_split} has {len(train_set)} samples, fewer than one batch "
                         f"(--batch_size {cfg.batch_size})")
    total_steps = min(cfg.max_steps or cfg.epochs * steps_per_epoch, cfg.epochs * steps_per_epoch)

    # the student, the teacher (never part of the student: stored by name), what the teacher's targets are pooled to
    model, amp = build_student(mcfg, cfg, env), runtime.amp_dtype(env.device, cfg.dtype)  # amp None: fp32
    teacher = None if cfg.distill == "none" else CLIPTeacher(
        cfg.teacher, device=env.device, trainable=cfg.teacher_trainable, init=cfg.teacher_init,
        dtype=amp or torch.float32, text_cache_size=cfg.teacher_text_cache)
    cv, ct = model.distill_widths(cfg.distill_loc)  # the teacher runs only the towers the modality needs
    widths = (cv if cfg.distill_modality != "text" else None, ct if cfg.distill_modality != "image" else None)

    # optimizer; a resumed run restores weights, optimizer, counters and RNG (the lr follows from the step)
    optimizer = torch.optim.AdamW(param_groups(model, teacher, cfg), weight_decay=cfg.weight_decay,
                                  fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)  # fp16 only: bf16 needs no loss scaling
    run = Run(cfg, env, model, model, teacher, precompute.OnTheFly(teacher, widths, cfg.channels_last), optimizer,
              scaler, train_set, eval_set, configs, steps_per_epoch, total_steps, time.time())
    step, best = resume(run) if cfg.resume else (0, -1.0)

    # what the step feeds the student and where the teacher's targets come from: the batch's canvases every step,
    # or (--cache_visual) the frozen visual branch's tokens and the frozen teacher's targets, computed once per sample
    # from the weights as they are now (after a resume: its own)
    if cfg.cache_visual:
        run.feed = precompute.Precomputed(train_set.dataset, model, teacher, widths, env.device)
        run.train_set = EpochSeeded(run.feed, cfg.seed)
    if cfg.compile:
        run.model = torch.compile(model)
    if env.ddp:
        run.model = DistributedDataParallel(run.model, device_ids=[env.local_rank] if env.device.type == "cuda"
                                            else None)
    describe(run)

    # loop: an epoch at a time (one data order each), evaluating every epoch or every eval_every steps
    metrics = {}
    while step < total_steps:
        step, best, metrics = train_epoch(run, step, best, metrics)

    # the final model on every split papers report for this dataset (val, testA, testB for RefCOCO)
    results = {}
    if cfg.final_eval:
        for split in data.DATASETS[dcfg.dataset].eval_splits:
            dataset = eval_set if split == cfg.eval_split else data.make_dataset(dcfg, split, tokenizer, train=False,
                                                                                 **sizes)
            results[split] = score(run, dataset)
        print_table(results)
    final = {"step": step, "best_acc@0.5": best,
             **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items() if k != "step"},
             **{f"{split}_{k}": v for split, m in results.items() for k, v in m.items()}}
    return final, model


def build_student(mcfg: ModelConfig, cfg: TrainConfig, env: DeviceEnv) -> GroundingModel:
    """The student on the device, the same init on every rank (DDP also broadcasts rank 0's weights); then each rank
    seeds its own stream (dropout). A resumed run takes every weight from its checkpoint, so it builds the branches at
    random instead of fetching BERT and DETR again. With --cache_visual its visual branch is frozen (precompute.py)."""
    torch.manual_seed(cfg.seed)
    model = interop.new_model(replace(mcfg, text_init="random", visual_init="random") if cfg.resume else mcfg)
    model = model.to(env.device)
    torch.manual_seed(cfg.seed + env.rank)
    random.seed(cfg.seed + env.rank)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.cache_visual:  # before the optimizer is built: it never sees the branch
        precompute.freeze_visual(model)
    print0(f"student parameters: {count_parameters(model)}")
    return model


def resume(run: Run) -> tuple[int, float]:
    """Restore --resume's weights, optimizer, scaler and RNG streams (a trainable teacher's weights from beside it);
    returns (step, best val Acc@0.5)."""
    cfg, teacher = run.cfg, run.teacher
    ckpt = files.load_training_state(cfg.resume, run.raw_model, run.optimizer, run.scaler, run.env)
    if teacher is not None and teacher.trainable:  # its weights were saved beside the student's
        teacher.model.load_state_dict(files.read_checkpoint(cfg.resume + ".teacher")["model"])
    step, best = ckpt["step"], ckpt["best_metric"]
    print0(f"resumed from {cfg.resume} at step {step} (epoch {step // run.steps_per_epoch}), best {best:.2f}")
    if cfg.epochs != ckpt["train_config"]["epochs"]:
        print0(f"--epochs {cfg.epochs}: the run, {ckpt['train_config']['epochs']} epochs long so far, continues to "
               f"step {run.total_steps} with the lr schedule of {cfg.epochs} epochs ({cfg.lr_schedule})")
    return step, best


def describe(run: Run) -> None:
    """Print the resolved configs and the run's shape; rank 0 writes them to out_dir/config.json."""
    cfg, env = run.cfg, run.env
    info = json.dumps({**run.configs, "world_size": env.world_size, "grad_accum": run.accum}, indent=1)
    print0(info)
    print0(f"{run.configs['data_config']['dataset']}: {len(run.train_set)} train samples, {run.steps_per_epoch} "
           f"steps/epoch, {run.total_steps} steps; global batch {cfg.batch_size} = micro-batch {cfg.micro_batch} x "
           f"{env.world_size} devices x {run.accum} accumulation steps")
    if env.is_master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            f.write(info)


if __name__ == "__main__":
    cli(main)
