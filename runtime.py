"""The run's plumbing, shared by train.py, evaluate.py, bench.py and toy.py.

Contents
  command line   parse_config: typed dataclasses -> flags (--key value or --key=value), presets (the recipes),
                 --help from each field's trailing comment
  devices        DeviceEnv, setup_device (cuda > mps > cpu; torchrun with NCCL on GPUs, gloo on CPUs), print0
  across ranks   sync_buffers, average_gradients, rng_states / restore_rng, merge_resumed (--resume's configs)
  data order     EpochSeeded, epoch_indices: which samples, with which augmentation, a rank sees at a step
  precision      amp_dtype, autocast_for: bf16/fp16 autocast on CUDA only, fp32 elsewhere (house rule R6)
  files          save_atomic (checkpoints never half-written), git_sha

Why not transformers.HfArgumentParser: it takes help texts only from field(metadata={"help": ...}), which would
double the length of every config class and move the help away from the one-line comments the house style asks
for; it cannot parse dict fields (ModelConfig.text_config: `--text_config={"hidden_size": 64}` is "invalid dict
value"); and presets still need the two-pass parse below. The hand-written parser is about 40 lines.

This file imports nothing from the project.
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

# -----------------------------------------------------------------------------
# command line from dataclasses


def field_comments(cls: type) -> dict[str, str]:
    """The trailing '# comment' of each dataclass field, used as its --help text."""
    found = (re.match(r"\s+(\w+):[^#]*#\s*(.*)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2] for m in found if m}


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_config(argv: list[str] | None, types: list[type], presets=None, description: str = "") -> list:
    """Build one instance of each dataclass in types from argv: --key value or --key=value for every field,
    converted by the field's type (--epochs=1e4 is an error, --lr=1 is 1.0; dict fields take JSON), unknown
    keys refused; a bool flag alone means true. presets: a function of the flags as first read ({field: value})
    that returns {field: value} defaults, applied between the dataclass defaults and the command line (train.py
    picks the paper's recipe by --dataset and --backbone)."""
    owner = {f.name: cls for cls in types for f in dataclasses.fields(cls)}

    def build(add_help: bool) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(description=description, allow_abbrev=False, add_help=add_help,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        for cls in types:
            comments = field_comments(cls)
            for f in dataclasses.fields(cls):
                kind = {bool: parse_bool, int: int, float: float, str: str}.get(f.type, json.loads)
                extra = {"nargs": "?", "const": True} if f.type is bool else {}
                parser.add_argument(f"--{f.name}", type=kind, default=f.default, metavar=f.name.upper(),
                                    help=f"{comments.get(f.name, '')} (default: %(default)s)", **extra)
        return parser

    argv = sys.argv[1:] if argv is None else argv
    parser = build(add_help=True)
    if presets:  # a first read (without --help, which would exit), so that --help shows the preset's values
        known, _ = build(add_help=False).parse_known_args(argv)
        parser.set_defaults(**presets(vars(known)))
    args = vars(parser.parse_args(argv))
    return [cls(**{k: v for k, v in args.items() if owner[k] is cls}) for cls in types]


# -----------------------------------------------------------------------------
# devices and processes


@dataclass(frozen=True)
class DeviceEnv:
    device: torch.device
    ddp: bool  # launched by torchrun: a process group is up
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def setup_device(device: str = "auto") -> DeviceEnv:
    """Pick the device (cuda > mps > cpu unless told) and, under torchrun, join the process group:
    NCCL on CUDA, gloo on CPU (so a 2-process CPU run works on a laptop)."""
    ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # set by torchrun
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DeviceEnv(dev, ddp, rank, local_rank, world)


def print0(*args, **kwargs) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# precision

DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def amp_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype (None = fp32) for --dtype auto|float32|bfloat16|float16 (or fp32|bf16|fp16): autocast on
    CUDA only; auto = bf16 on GPUs that support it (Ampere and later), fp32 elsewhere."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16 (or fp32, bf16, fp16), got {dtype!r}")
    if device.type != "cuda":
        if name in ("bfloat16", "float16"):
            raise ValueError(f"--dtype {dtype} needs CUDA: on {device.type} everything runs in float32")
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return DTYPES[name]


def autocast_for(device: torch.device, dtype: str = "auto"):
    """The autocast context for amp_dtype(device, dtype), or a no-op. Losses and box maths stay fp32 regardless."""
    amp = amp_dtype(device, dtype)
    return torch.autocast("cuda", amp) if amp is not None else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# state across processes and restarts


def sync_buffers(model: torch.nn.Module, env: DeviceEnv) -> None:
    """Rank 0's buffers (BatchNorm statistics with trainable_bn) on every rank, as DDP broadcasts them before each
    training forward: evaluation and checkpoints then see one model, whichever rank runs them."""
    if env.ddp:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def average_gradients(params, world_size: int) -> None:
    """All-reduce the gradients of parameters DDP does not manage, as one flat buffer (one collective, not one
    per tensor), and divide by the world size, as DDP does for the model it wraps."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def rng_states(env: DeviceEnv) -> dict[str, list[torch.Tensor]]:
    """Every rank's torch RNG state, CPU and (where dropout runs on it) CUDA, gathered on all ranks."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if env.device.type == "cuda" else None}
    states = [state]
    if env.ddp:
        states = [None] * env.world_size
        dist.all_gather_object(states, state)
    return {"cpu": [s["cpu"] for s in states], "cuda": [s["cuda"] for s in states if s["cuda"] is not None]}


def restore_rng(rng: dict[str, list[torch.Tensor]], env: DeviceEnv) -> None:
    """This rank's streams from rng_states (a run resumed on another number of ranks cycles through them)."""
    torch.set_rng_state(rng["cpu"][env.rank % len(rng["cpu"])])
    if env.device.type == "cuda" and rng.get("cuda"):
        torch.cuda.set_rng_state(rng["cuda"][env.rank % len(rng["cuda"])])


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
        raise ValueError(f"{what}: {', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in changed)}: a resumed run "
                         f"continues its checkpoint's run, so only {sorted(may_change)} may change; start a new run "
                         f"(--out_dir) to change the rest")
    return [dataclasses.replace(o, **{k: new[k] for k in given & set(dataclasses.asdict(o)) if k in may_change})
            for o in olds]


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
# files


def save_atomic(obj: dict, path: str) -> None:
    """torch.save to a temp file, then os.replace: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def git_sha() -> str:
    """The commit this code runs from, for checkpoints and logs ("unknown" outside a git checkout)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
