"""Train EpmVG: the TransVG student with the CLIP distillation loss (paper eq. 8), on CPU, one GPU or many.

    python train.py                                              # synthetic world, laptop CPU, minutes
    python train.py --dataset refcoco                            # one GPU: the paper's recipe, grad accumulation
    torchrun --nproc_per_node=8 train.py --dataset refcoco       # the paper's 8 GPUs x 8 images
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py --dataset refcoco
    python train.py --dataset refcoco --distill none             # the TransVG baseline ("w/o" rows)
    python train.py --resume out/refcoco/last.pt                 # continue exactly where it stopped

Every field of TrainConfig and ModelConfig is a flag (--key value or --key=value; --help lists them). Per-dataset
presets (PRESETS) hold the paper's recipe; flags override them. The body reads top to bottom: config, device,
data, model, teacher, optimizer, resume, loop. Checkpoints are plain data (weights_only=True loads them), hold the
student only (the teacher is stored by name), and are written atomically by rank 0.

References: EpmVG paper sec. 4.2; TransVG (github.com/djiajunustc/TransVG @ c862427) train.py and engine.py.
"""

import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import data
from clip_teacher import CLIPTeacher, ToyCLIPConfig, build_toy_teacher
from evaluate import (
    DeviceEnv,
    amp_dtype,
    autocast_for,
    dataset_for,
    evaluate,
    parse_config,
    print0,
    print_table,
    setup_device,
)
from losses import distill_loss, total_loss
from model import GroundingModel, ModelConfig, count_parameters, read_checkpoint

FORMAT_VERSION = 1

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    dataset: str = "shapes"  # refcoco, refcoco+, refcocog, refcocog_google, referit, flickr30k, shapes (synthetic)
    split_root: str = "data"  # TransVG split files: <split_root>/<unc|unc+|gref|gref_umd|referit|flickr>/
    data_root: str = "ln_data"  # images in TransVG's ln_data/ layout
    train_split: str = "train"  # split to train on
    eval_split: str = "val"  # split for model selection during training (best.pt)
    augment: bool = True  # TransVG's train augmentation (scale, crop, colour, flip with word swap, translate)
    drop_invalid: bool = False  # skip split-file entries with an empty expression or a zero-area box (warns)
    shapes_train_size: int = 0  # shapes: generated training scenes (0 = data.py's default)
    shapes_eval_size: int = 0  # shapes: scenes per val/test split (0 = data.py's default)
    shapes_image_size: int = 128  # shapes: long side of the generated images, pixels
    epochs: int = 90  # paper: 90 (180 for RefCOCO+)
    lr_drop: int = 60  # every lr x0.1 from this epoch on (paper: 60; 120 for RefCOCO+)
    batch_size: int = 64  # global images per optimizer step (paper: 8 GPUs x 8)
    micro_batch: int = 8  # images per device per forward; gradient accumulation makes up batch_size
    lr: float = 1e-4  # fusion transformer, projections, [REG], position table, box head
    lr_visual: float = 1e-5  # ResNet and DETR encoder (and a --teacher_trainable CLIP)
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
    teacher_trainable: bool = False  # Table 5 "unfrozen": CLIP trains at lr_visual with the distillation grads
    teacher_text_cache: int = 0  # frozen teacher: keep this many text embeddings, keyed on the exact expression
    toy_teacher_steps: int = 400  # shapes: training steps of the toy CLIP that is built when --teacher is missing
    checkpoint_dir: str = "checkpoints"  # where visual_init=detr finds TransVG's detr-r50-unc.pth etc.
    out_dir: str = ""  # default out/<dataset>
    resume: str = ""  # a last.pt to continue from
    eval_every: int = 0  # optimizer steps between evaluations (0 = at the end of every epoch)
    eval_batch: int = 32  # images per device when evaluating
    final_eval: bool = True  # at the end, evaluate every split the papers report and print the table
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
    dtype: str = "auto"  # autocast: auto (bf16 on GPUs that have it, else fp32), float32, bfloat16, float16 (+scaler)
    compile: bool = False  # torch.compile the student
    channels_last: bool = False  # channels_last memory format for the ResNet (faster with bf16 on GPUs)
    num_workers: int = 4  # data loader processes per device
    seed: int = 13  # base seed; rank r uses seed + r (TransVG: 13)


# The paper's recipe per dataset: the DETR checkpoint of TransVG for the visual branch, pretrained BERT, TransVG's
# query length (40 tokens for RefCOCOg), 180 epochs for RefCOCO+. DETR_FAMILY names TransVG's DETR checkpoint.
PAPER = {"visual_init": "detr", "text_init": "pretrained", "text_encoder": "bert-base-uncased"}
PRESETS = {name: {**PAPER, "max_query_len": info.max_query_len} for name, info in data.DATASETS.items()
           if name != "shapes"}
PRESETS["refcoco+"].update(epochs=180, lr_drop=120)
# The synthetic world, sized for a 2-core laptop CPU (8.5 minutes with its toy CLIP teacher, README): a ResNet-18 at
# 128 px learned from scratch (so ordinary BatchNorm, trainable_bn), a tiny BERT over the world's 24 words, 2 + 2
# transformer layers of width 128, 800 steps of 32 with the lr x0.1 for the last quarter. Data loading stays in the
# main process: on 2 cores a worker process only competes with the model for them.
TOY = dict(backbone="resnet18", trainable_bn=True, imsize=128, hidden_dim=128, nheads=4, dim_feedforward=256,
           enc_layers=2, vl_layers=2, max_query_len=16, text_encoder="out/shapes_vocab", text_init="random",
           text_config={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 256, "max_position_embeddings": 32},
           visual_init="random", teacher="out/shapes_clip", epochs=4, lr_drop=3, batch_size=32, micro_batch=32,
           lr=2e-4, lr_visual=2e-4, lr_text=2e-4, shapes_train_size=6400, num_workers=0, eval_batch=64)
PRESETS["shapes"] = TOY
DETR_FAMILY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "gref", "refcocog_google": "gref",
               "referit": "referit", "flickr30k": "referit"}


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of every base lr at an optimizer step: linear warmup, then x0.1 from epoch lr_drop (TransVG's
    StepLR). A pure function of the step, so resuming needs no scheduler state."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    return warm * (0.1 if step >= cfg.lr_drop * steps_per_epoch else 1.0)


def param_groups(model: GroundingModel, teacher: CLIPTeacher | None, cfg: TrainConfig) -> list[dict]:
    """TransVG's groups: visual branch and BERT at 1e-5, everything new at 1e-4; a trainable teacher joins the
    visual lr (paper Table 5). Weight decay on every parameter, biases and norms included, as TransVG does."""
    groups = {"fusion": [], "visual": [], "text": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            kind = ("visual" if name.startswith(("backbone.", "input_proj.", "visual_encoder.")) else
                    "text" if name.startswith("text_encoder.") else "fusion")
            groups[kind].append(p)
    base = {"fusion": cfg.lr, "visual": cfg.lr_visual, "text": cfg.lr_text}
    out = [{"name": k, "params": v, "base_lr": base[k], "lr": base[k]} for k, v in groups.items()]
    if teacher is not None and cfg.teacher_trainable:
        out.append({"name": "teacher", "params": list(teacher.parameters()), "base_lr": cfg.lr_visual,
                    "lr": cfg.lr_visual})
    return out


# -----------------------------------------------------------------------------
# data order: a pure function of (seed, epoch, rank), so a resumed run sees exactly the same samples


class EpochSeeded(Dataset):
    """Makes each sample's augmentation a function of (seed, epoch, index) instead of the worker and the order in
    which samples are drawn: resuming mid-epoch, or changing num_workers, replays the very same crops and flips."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i) % 2**62
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # saves and restores the CPU generator, the one transforms use
            torch.default_generator.manual_seed(sample_seed)  # not torch.manual_seed: it would reseed CUDA's too
            random.seed(sample_seed)
            try:
                return self.dataset[i]
            finally:
                random.setstate(state)


def epoch_indices(n: int, epoch: int, seed: int, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """This rank's sample indices for an epoch: one shuffle shared by all ranks (drop_last), each global batch
    split into world_size contiguous slices. Shape (steps_per_epoch * batch_size / world,)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    steps = n // batch_size
    return perm[: steps * batch_size].view(steps, world, -1)[:, rank].reshape(-1)


# -----------------------------------------------------------------------------
# checkpoints


def save_atomic(obj: dict, path: str) -> None:
    """torch.save to a temp file, then os.replace: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def average_gradients(params, world_size: int) -> None:
    """All-reduce the gradients of parameters DDP does not manage, as one flat buffer (one collective, not one
    per tensor), and divide by the world size, as DDP does for the student."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -----------------------------------------------------------------------------
# main


# What a resumed run may change: where and how fast it runs, when it stops and evaluates. Anything else would make
# it a different run than the one it continues.
RESUME_MAY_CHANGE = {"resume", "max_steps", "out_dir", "device", "dtype", "compile", "channels_last", "num_workers",
                     "micro_batch", "eval_every", "eval_batch", "final_eval", "checkpoint_dir"}


def resume_config(cfg: TrainConfig, mcfg: ModelConfig, argv: list[str]) -> tuple[TrainConfig, ModelConfig]:
    """--resume continues the checkpoint's run: its configs, with the flags given now on top, if they may change."""
    ckpt = read_checkpoint(cfg.resume)
    old_train, old_model = TrainConfig(**ckpt["train_config"]), ModelConfig(**ckpt["model_config"])
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    new = {**asdict(cfg), **asdict(mcfg)}
    old = {**asdict(old_train), **asdict(old_model)}

    def same(k: str) -> bool:  # the checkpoint holds the resolved BERT config, the flag may give part of it
        if k == "text_config" and new[k] and old[k]:
            return all(old[k].get(key) == value for key, value in new[k].items())
        return new[k] == old[k]

    changed = sorted(k for k in given - RESUME_MAY_CHANGE if not same(k))
    if changed:
        raise ValueError(f"--resume {cfg.resume}: {', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in changed)}: "
                         f"a resumed run continues its checkpoint's run, so only {sorted(RESUME_MAY_CHANGE)} may "
                         f"change; start a new run (--out_dir) to change the rest")
    return (replace(old_train, **{k: new[k] for k in given if hasattr(old_train, k)}),
            replace(old_model, **{k: new[k] for k in given if hasattr(old_model, k) and k != "text_config"}))


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = sys.argv[1:] if argv is None else argv
    cfg, mcfg = parse_config(argv, [TrainConfig, ModelConfig], PRESETS, __doc__)
    if cfg.resume:
        cfg, mcfg = resume_config(cfg, mcfg, argv)
    env = setup_device(cfg.device)
    try:
        return train(cfg, mcfg, env)[0]
    finally:
        if env.ddp:
            dist.destroy_process_group()


def resolve(cfg: TrainConfig, mcfg: ModelConfig) -> tuple[TrainConfig, ModelConfig]:
    """Fill what the flags leave implicit: the output folder and the DETR checkpoint path."""
    cfg = replace(cfg, out_dir=cfg.out_dir or os.path.join("out", cfg.dataset))
    if mcfg.visual_init == "detr":
        path = os.path.join(cfg.checkpoint_dir,
                            f"detr-{'r101' if mcfg.backbone == 'resnet101' else 'r50'}-{DETR_FAMILY[cfg.dataset]}.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: the paper initialises the visual branch from TransVG's DETR checkpoints "
                f"(COCO without the grounding val/test images; links in TransVG's README). Put it there, point "
                f"--checkpoint_dir at it, or pass --visual_init imagenet|random|<path>.")
        mcfg = replace(mcfg, visual_init=path)
    return cfg, mcfg


def prepare_world(cfg: TrainConfig, mcfg: ModelConfig, env: DeviceEnv) -> None:
    """The synthetic world needs no download, but its BERT vocabulary and its toy CLIP teacher are made here, once,
    by rank 0, and reused by later runs. Only at the preset's paths or at absolute ones: a hub name such as
    openai/clip-vit-base-patch16 must never become a local folder of toy files."""
    def ours(path: str, preset: str) -> bool:
        return not os.path.exists(path) and (path == preset or os.path.isabs(path))

    if env.is_master and ours(mcfg.text_encoder, TOY["text_encoder"]):
        print0(f"writing the synthetic world's vocabulary to {data.write_shapes_vocab(mcfg.text_encoder)}")
    if env.is_master and cfg.distill != "none" and ours(cfg.teacher, TOY["teacher"]):
        print0(f"no CLIP teacher at {cfg.teacher}: training the synthetic world's toy CLIP first "
               f"(python clip_teacher.py does the same)")
        build_toy_teacher(ToyCLIPConfig(out_dir=cfg.teacher, steps=cfg.toy_teacher_steps, imsize=mcfg.imsize,
                                        shapes_image_size=cfg.shapes_image_size))
    if env.ddp:
        dist.barrier()


def train(cfg: TrainConfig, mcfg: ModelConfig, env: DeviceEnv) -> tuple[dict[str, float], GroundingModel]:
    """The training run; returns the final metrics and the trained (unwrapped) student."""
    cfg, mcfg = resolve(cfg, mcfg)
    per_step = cfg.micro_batch * env.world_size
    if cfg.batch_size % per_step:
        raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of micro_batch x world_size = {per_step}")
    accum = cfg.batch_size // per_step
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.dataset == "shapes":
        prepare_world(cfg, mcfg, env)

    # data
    tokenizer = data.load_tokenizer(mcfg.text_encoder)
    if mcfg.text_init == "random" and mcfg.text_config is not None and "vocab_size" not in mcfg.text_config:
        mcfg = replace(mcfg, text_config={**mcfg.text_config, "vocab_size": len(tokenizer)})
    train_set = EpochSeeded(dataset_for(cfg.dataset, cfg.train_split, tokenizer, mcfg, asdict(cfg),
                                        train=cfg.augment), cfg.seed)
    eval_set = dataset_for(cfg.dataset, cfg.eval_split, tokenizer, mcfg, asdict(cfg))
    steps_per_epoch = len(train_set) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{cfg.dataset}/{cfg.train_split} has {len(train_set)} samples, fewer than one batch")
    total_steps = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)

    # model (same init on every rank; DDP also broadcasts rank 0's weights). A resumed run takes every weight from
    # its checkpoint, so it builds the branches at random instead of fetching BERT and DETR again.
    torch.manual_seed(cfg.seed)
    model = GroundingModel(replace(mcfg, text_init="random", visual_init="random") if cfg.resume else mcfg)
    model = model.to(env.device)
    torch.manual_seed(cfg.seed + env.rank)  # from here on (dropout) every rank has its own stream
    random.seed(cfg.seed + env.rank)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    mcfg = replace(mcfg, text_config=model.cfg.text_config)  # resolved BERT config: checkpoints rebuild offline
    print0(f"student parameters: {count_parameters(model)}")
    amp = amp_dtype(env.device, cfg.dtype)  # None = fp32
    teacher = None
    if cfg.distill != "none":
        teacher = CLIPTeacher(cfg.teacher, device=env.device, trainable=cfg.teacher_trainable,
                              dtype=amp or torch.float32, text_cache_size=cfg.teacher_text_cache)
    # the teacher only runs the towers the chosen modality needs (image-only skips CLIP's text tower)
    cv, ct = model.distill_widths(cfg.distill_loc)
    widths = (cv if cfg.distill_modality != "text" else None, ct if cfg.distill_modality != "image" else None)
    optimizer = torch.optim.AdamW(param_groups(model, teacher, cfg), weight_decay=cfg.weight_decay,
                                  fused=env.device.type == "cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)  # fp16 only: bf16 needs no loss scaling

    # resume: weights, optimizer, counters and RNG; the lr follows from the step
    step, best, start = 0, -1.0, time.time()
    if cfg.resume:
        ckpt = read_checkpoint(cfg.resume)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, best = ckpt["step"], ckpt["best_metric"]
        if ckpt["scaler"] is not None:
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["cpu"][env.rank % len(ckpt["rng"]["cpu"])])
        if env.device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"][env.rank % len(ckpt["rng"]["cuda"])])
        if teacher is not None and cfg.teacher_trainable:
            teacher.model.load_state_dict(read_checkpoint(cfg.resume + ".teacher")["model"])
        print0(f"resumed from {cfg.resume} at step {step} (epoch {step // steps_per_epoch}), best {best:.2f}")

    raw_model = model  # unwrapped and uncompiled: what checkpoints hold
    if cfg.compile:
        model = torch.compile(model)
    eval_model = model  # evaluation needs no DDP: its forward would broadcast buffers, a collective, per batch
    if env.ddp:
        model = DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)

    resolved = {"train": asdict(cfg), "model": asdict(mcfg), "world_size": env.world_size, "grad_accum": accum}
    print0(json.dumps(resolved, indent=1))
    print0(f"{cfg.dataset}: {len(train_set)} train samples, {steps_per_epoch} steps/epoch, {total_steps} steps; "
           f"global batch {cfg.batch_size} = micro-batch {cfg.micro_batch} x {env.world_size} devices x {accum} "
           f"accumulation steps")
    if env.is_master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(resolved, f, indent=1)

    def sync_buffers() -> None:
        """Rank 0's buffers (BatchNorm statistics with trainable_bn) on every rank, as DDP broadcasts them before
        each training forward: evaluation and checkpoints then see one model, whichever rank runs them."""
        if env.ddp:
            for buffer in raw_model.buffers():
                dist.broadcast(buffer, src=0)

    def checkpoint(name: str, metric: float) -> None:
        sync_buffers()
        # every rank's dropout stream (CPU, and CUDA's where dropout runs), so a resumed run continues each of them
        state = {"cpu": torch.get_rng_state(),
                 "cuda": torch.cuda.get_rng_state() if env.device.type == "cuda" else None}
        states = [state]
        if env.ddp:
            states = [None] * env.world_size
            dist.all_gather_object(states, state)
        rng = {"cpu": [s["cpu"] for s in states], "cuda": [s["cuda"] for s in states if s["cuda"] is not None]}
        if not env.is_master:
            return
        save_atomic({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                     "step": step, "epoch": step // steps_per_epoch, "best_metric": metric,
                     "model_config": asdict(mcfg), "train_config": asdict(cfg),
                     "teacher": None if teacher is None else {"name": teacher.name, "sha256": teacher.weights_sha256},
                     "rng": rng, "git_sha": git_sha(), "format_version": FORMAT_VERSION},
                    os.path.join(cfg.out_dir, name))
        if teacher is not None and cfg.teacher_trainable:  # a tuned teacher is not ours to put in the student
            save_atomic({"model": teacher.model.state_dict()}, os.path.join(cfg.out_dir, name + ".teacher"))

    def validate() -> dict[str, float]:
        """Evaluate on eval_split (all ranks), keep best.pt, print; returns the metrics."""
        nonlocal best
        sync_buffers()
        metrics, _ = evaluate(eval_model, eval_set, env.device, cfg.eval_batch, min(cfg.num_workers, 2),
                              dtype=cfg.dtype)
        if metrics["acc@0.5"] > best:
            best = metrics["acc@0.5"]
            checkpoint("best.pt", best)
        print0(f"step {step}: {cfg.eval_split} Acc@0.5 {metrics['acc@0.5']:.2f} (best {best:.2f}), "
               f"Acc@0.75 {metrics['acc@0.75']:.2f}, mIoU {metrics['miou']:.3f}")
        return {**metrics, "step": step}

    autocast = autocast_for(env.device, cfg.dtype)
    metrics, log_path = {}, os.path.join(cfg.out_dir, "log.jsonl")
    while step < total_steps:
        epoch = step // steps_per_epoch
        train_set.epoch = epoch
        order = epoch_indices(len(train_set), epoch, cfg.seed, env.rank, env.world_size, cfg.batch_size)
        order = order[(step % steps_per_epoch) * cfg.batch_size // env.world_size:]  # skip what a resume has done
        # its own generator: a DataLoader otherwise draws its worker seed from the global RNG (dropout's stream)
        loader = DataLoader(train_set, batch_size=cfg.micro_batch, sampler=order.tolist(), collate_fn=data.collate,
                            num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda", drop_last=True,
                            generator=torch.Generator())
        batches = iter(loader)
        epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
        bar = tqdm(total=epoch_end - step, desc=f"epoch {epoch}", disable=not env.is_master, dynamic_ncols=True)
        sums, seen, done, t0 = {}, 0, 0, time.time()
        while step < epoch_end:
            factor = lr_factor(step, steps_per_epoch, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            terms_total = {}
            for micro in range(accum):
                batch = {k: v.to(env.device, non_blocking=True) if torch.is_tensor(v) else v
                         for k, v in next(batches).items()}
                images = batch["image"]
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # gradients are all-reduced only on the last micro-step of an optimizer step
                last = micro == accum - 1
                with model.no_sync() if env.ddp and not last else contextlib.nullcontext():
                    with autocast:
                        out = model(images, batch["img_is_pad"], batch["input_ids"], batch["attention_mask"])
                    distill_terms = {}
                    if teacher is not None:
                        targets = teacher.targets(images, batch["text"], widths)
                        distill_terms = distill_loss(out["distill"][cfg.distill_loc], targets, cfg.distill,
                                                     cfg.distill_modality, cfg.alpha, cfg.beta)
                    loss, terms = total_loss(out["pred_boxes"], batch["target"], cfg.box_loss, cfg.giou_weight,
                                             distill_terms)
                    scaler.scale(loss / accum).backward()
                for k, v in terms.items():
                    terms_total[k] = terms_total.get(k, 0.0) + v.detach() / accum
            # one small all-reduce per step: logs the global mean and stops every rank together on NaN
            values = torch.stack(list(terms_total.values())).float()
            if env.ddp:
                dist.all_reduce(values)
                values /= env.world_size
            values = values.tolist()
            if not all(math.isfinite(v) for v in values):
                raise FloatingPointError(
                    f"non-finite loss at step {step} (epoch {epoch}): {dict(zip(terms_total, values))}; stopped "
                    f"before the optimizer step, so {cfg.out_dir}/last.pt is the last good checkpoint")
            if teacher is not None and cfg.teacher_trainable and env.ddp:
                average_gradients(teacher.parameters(), env.world_size)  # the teacher is outside DDP
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done += 1
            seen += cfg.batch_size
            for k, v in zip(terms_total, values):
                sums[k] = sums.get(k, 0.0) + v
            bar.update(1)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in zip(terms_total, values)}, "lr": f"{cfg.lr * factor:.1e}",
                             "img/s": f"{seen / (time.time() - t0):.1f}"})
            if cfg.eval_every and step % cfg.eval_every == 0:
                metrics = validate()
        bar.close()
        # eval_every = 0: evaluate every epoch; otherwise every eval_every steps, and once more at the very end
        if not cfg.eval_every or (step == total_steps and step % cfg.eval_every):
            metrics = validate()
        checkpoint("last.pt", best)
        line = {"epoch": epoch, "step": step, "lr": cfg.lr * factor, **{f"train_{k}": v / done for k, v in sums.items()},
                **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items()}, "images_per_s": seen / (time.time() - t0),
                "elapsed_s": time.time() - start}
        if env.is_master:
            with open(log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
    # the final model on every split papers report for this dataset (val, testA, testB for RefCOCO)
    results = {}
    if cfg.final_eval:
        for split in data.DATASETS[cfg.dataset].eval_splits:
            dataset = eval_set if split == cfg.eval_split else dataset_for(cfg.dataset, split, tokenizer, mcfg,
                                                                          asdict(cfg))
            results[split], _ = evaluate(eval_model, dataset, env.device, cfg.eval_batch, min(cfg.num_workers, 2),
                                         dtype=cfg.dtype)
        print_table(results)
    final = {"step": step, "best_acc@0.5": best,
             **{f"{cfg.eval_split}_{k}": v for k, v in metrics.items() if k != "step"},
             **{f"{split}_{k}": v for split, m in results.items() for k, v in m.items()}}
    return final, raw_model


if __name__ == "__main__":
    main()
