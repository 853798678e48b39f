"""The run's plumbing, shared by train.py, evaluate.py, bench.py and toy.py.

Contents
  command line   parse_config: typed dataclasses -> flags (--key value or --key=value), presets (the recipes),
                 --help from each field's trailing comment; UsageError and cli: a user's mistake is one message,
                 exit status 2, no traceback (a bug in the program keeps its traceback)
  devices        DeviceEnv, check_device, setup_device (cuda > mps > cpu; torchrun with NCCL on GPUs, gloo on CPUs),
                 print0
  across ranks   sync_buffers, average_gradients, rng_states / restore_rng, save_training_state /
                 load_training_state (exact resume), merge_resumed (--resume's configs)
  data order     EpochSeeded, epoch_indices: which samples, with which augmentation, a rank sees at a step
  precision      amp_dtype, autocast_for: bf16/fp16 autocast on CUDA only, fp32 elsewhere (house rule R6)
  files          save_atomic (checkpoints never half-written, disk full said so), lock_run_dir (one run per
                 folder), holds_run, check_run_dir / claim_run_dir (a run never overwrites another), find_pretrained
                 (a transformers model on disk or in the Hugging Face cache, asked of the hub once), git_sha

Why not transformers.HfArgumentParser: it takes help texts only from field(metadata={"help": ...}), which would
double the length of every config class and move the help away from the one-line comments the house style asks
for; it cannot parse dict fields (ModelConfig.text_config: `--text_config={"hidden_size": 64}` is "invalid dict
value"); and presets still need the two-pass parse below. The hand-written parser is about 40 lines.

This file imports nothing from the project.
"""

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import inspect
import itertools
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

# -----------------------------------------------------------------------------
# user errors: one message, exit status 2


class UsageError(ValueError):
    """The user asked for something impossible (a flag's value, a file, a folder): the message names it and says
    what to do. cli() prints it alone; any other exception is a bug and keeps its traceback. A ValueError, so that
    the configs' __post_init__ checks (check_fields) are usage errors for parse_config too."""


def cli(main) -> None:
    """Run a script's main() from the command line: a UsageError is printed once (by rank 0 under torchrun; every
    rank stops) as `error: <message>`, and the exit status is 2, as for a bad flag. main(argv) itself raises, so
    tests call it directly."""
    try:
        main()
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


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
        parser = _Parser(description=description, allow_abbrev=False, add_help=add_help,
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
    try:  # the configs check their own values (__post_init__): a bad one is a usage error, like a bad type
        return [cls(**{k: v for k, v in args.items() if owner[k] is cls}) for cls in types]
    except ValueError as e:
        parser.error(str(e))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # under torchrun, rank 0 alone says it (every rank exits with status 2)
        if os.environ.get("RANK", "0") == "0":
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def check_fields(cfg, rules: list[tuple[str, bool, str]]) -> None:
    """For a config's __post_init__: rules are (field, ok, what is expected); the first broken one raises
    UsageError("--field: expected ..., got <value>"), which parse_config reports with the usage line."""
    for name, ok, expected in rules:
        if not ok:
            raise UsageError(f"--{name}: expected {expected}, got {getattr(cfg, name)!r}")


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


def check_device(device: str, local_rank: int = 0) -> None:
    """--device names one this machine has (torch's own error would come later, as a traceback about drivers)."""
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: this machine has no CUDA GPU that torch can use (torch "
                         f"{torch.__version__}, CUDA build {torch.version.cuda}); pass --device cpu (or auto)")
    if kind == "cuda" and local_rank >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: process {local_rank} of this node needs GPU {local_rank}, but the "
                         f"machine has {torch.cuda.device_count()}; start at most that many (--nproc_per_node)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: Apple's MPS is not available on this machine; pass --device cpu "
                         f"(or auto)")


def setup_device(device: str = "auto") -> DeviceEnv:
    """Pick the device (cuda > mps > cpu unless told; one this machine lacks is a UsageError) and, under torchrun,
    join the process group: NCCL on CUDA, gloo on CPU (so a 2-process CPU run works on a laptop)."""
    ddp = all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))  # set by torchrun
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    check_device(device, local_rank)
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
DTYPE_NAMES = {"auto", *DTYPES, *DTYPE_ALIASES}  # what --dtype accepts


def amp_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype (None = fp32) for --dtype auto|float32|bfloat16|float16 (or fp32|bf16|fp16): autocast on
    CUDA only; auto = bf16 on GPUs that support it (Ampere and later), fp32 elsewhere."""
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name != "auto" and name not in DTYPES:
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16 (or fp32, bf16, fp16), got {dtype!r}")
    if device.type != "cuda":
        if name in ("bfloat16", "float16"):
            raise UsageError(f"--dtype {dtype} needs CUDA: on {device.type} everything runs in float32")
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


def save_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, env: DeviceEnv, extra: dict,
                        sidecar: torch.nn.Module | None = None) -> None:
    """A checkpoint a run can resume from exactly, as plain data (weights_only=True loads it), written atomically
    by rank 0: model (unwrapped, uncompiled), optimizer, scaler, every rank's RNG streams, the git sha, and extra.
    sidecar: another module's weights, to path + ".teacher". Every rank must call it (they gather RNG states)."""
    sync_buffers(model, env)
    rng = rng_states(env)  # every rank's dropout stream: a resumed run continues each of them
    if not env.is_master:
        return
    save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rng, "git_sha": git_sha(),
                 **extra}, path)
    if sidecar is not None:
        save_atomic({"model": sidecar.state_dict()}, path + ".teacher")


def load_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, env: DeviceEnv, sidecar: torch.nn.Module | None = None
                        ) -> dict:
    """Restore what save_training_state wrote, this rank's RNG streams included; returns the checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], env)
    if sidecar is not None:
        sidecar.load_state_dict(torch.load(path + ".teacher", map_location="cpu", weights_only=True)["model"])
    return ckpt


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
        raise UsageError(f"{what}: {', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in changed)}: a resumed run "
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
    """torch.save into a temp file of its own (two writers never share one), fsync it, then os.replace it onto
    path and fsync the folder: a crash or a full disk never leaves a half-written checkpoint, and the previous
    one stays as it was. A full disk is reported as such, naming the file; the temp file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch reports a failed write as a RuntimeError whose context is the OSError (or, writing to a path
        # itself, as "basic_ios::clear: iostream error" with no errno at all)
        if any(getattr(x, "errno", None) == errno.ENOSPC for x in (e, e.__cause__, e.__context__)):
            kept = "the previous checkpoint is intact" if os.path.exists(path) else "nothing was written"
            raise OSError(errno.ENOSPC, f"no space left writing {path}; {kept}") from e
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


RUN_FILES = ("last.pt", "best.pt", "log.jsonl", "config.json")  # what makes a folder "hold a run"


def holds_run(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in RUN_FILES)


def lock_holder(folder: str) -> str | None:
    """The pid of the run that holds folder's lock (lock_run_dir), or None; creates nothing."""
    try:
        lock = open(os.path.join(folder, ".lock"))
    except OSError:  # no lock file (or no folder): no run has ever held it
        return None
    with lock:
        try:  # taken for an instant and given back when the file closes
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "unknown"
    return None


def check_run_dir(out_dir: str, resume: str = "", overwrite: bool = False, locked: bool = False) -> None:
    """The refusals of claim_run_dir, checked without creating or locking anything (a command that is refused
    leaves no folder behind): out_dir must be a folder we can make, hold no run (unless resumed from or
    overwritten) and be in use by no other run (locked: this process holds its lock)."""
    if not out_dir:
        return
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"--out_dir {out_dir} is a file, not a folder: pass another --out_dir")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):  # the folder that makedirs would create everything in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out_dir {out_dir}: cannot create or write it ({parent} is "
                         f"{'not a folder' if not os.path.isdir(parent) else 'not writable'}); pass another --out_dir")
    holder = None if locked else lock_holder(out_dir)
    if holder is not None:
        raise UsageError(f"--out_dir {out_dir} is in use by another run (pid {holder}); wait for it to finish, or "
                         f"pass another --out_dir")
    resuming_here = resume and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(out_dir)
    if holds_run(out_dir) and not resuming_here and not overwrite:
        found = ", ".join(f for f in RUN_FILES if os.path.exists(os.path.join(out_dir, f)))
        raise UsageError(f"--out_dir {out_dir} holds a run ({found}): pass --resume "
                         f"{os.path.join(out_dir, 'last.pt')} to continue it, --overwrite to delete it and start over, "
                         f"or another --out_dir")


def lock_run_dir(folder: str):
    """Create folder and hold an exclusive lock on it for as long as the returned file stays open (the OS drops
    it when the process dies, even by kill -9), so two runs never write one folder; a second run is refused with
    the first one's pid. Then removes the temp files a killed run may have left there."""
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise UsageError(f"--out_dir {folder} is in use by another run (pid {holder}); wait for it to finish, or "
                         f"pass another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    for name in os.listdir(folder):
        if name.endswith(".tmp"):  # save_atomic's temp files: only a killed run leaves one behind
            os.remove(os.path.join(folder, name))
    return lock


def claim_run_dir(out_dir: str, default: str, resume: str, overwrite: bool, env: DeviceEnv):
    """The run's folder and rank 0's lock on it, held for the whole run (every rank gets the path). A folder that
    holds a run is never written over by accident: resume (from a checkpoint in it) continues it, overwrite
    deletes it first, anything else is refused (check_run_dir, which the scripts also call before they build
    anything; here again, under the lock, for a run that started in between); with no out_dir, the first of
    default, default_2, ... that holds no run and is not in use. Returns (folder, lock: close it when the run ends)."""
    lock = None
    if env.is_master and not out_dir:
        for out_dir in itertools.chain([default], (f"{default}_{n}" for n in itertools.count(2))):
            with contextlib.suppress(UsageError):  # in use by another run: try the next one
                lock = None if holds_run(out_dir) else lock_run_dir(out_dir)
            if lock is not None:
                break
        if out_dir != default:
            print0(f"{default} holds an earlier run: this one goes to {out_dir}")
    elif env.is_master:
        lock = lock_run_dir(out_dir)
        try:
            check_run_dir(out_dir, resume, overwrite, locked=True)
        except UsageError:
            lock.close()
            raise
        resuming_here = resume and os.path.abspath(os.path.dirname(resume)) == os.path.abspath(out_dir)
        if overwrite and holds_run(out_dir) and not resuming_here:
            for name in os.listdir(out_dir):
                if name in RUN_FILES or name.endswith(".teacher"):
                    os.remove(os.path.join(out_dir, name))
            print0(f"--overwrite: deleted the run that was in {out_dir}")
    if env.ddp:
        shared = [out_dir]
        dist.broadcast_object_list(shared, src=0)
        out_dir = shared[0]
    return out_dir, lock


def is_hub_name(name: str) -> bool:
    """A Hugging Face hub name (bert-base-uncased, openai/clip-vit-base-patch16) rather than a path, if nothing is
    there on disk; transformers decides so too."""
    return not os.path.exists(name) and not (os.path.isabs(name) or name.startswith(".") or name.count("/") > 1)


def find_pretrained(name: str, filename: str = "config.json", hub_timeout: float = 5.0) -> str | None:
    """Why transformers could not load the model `name` (a local folder, or a hub name), or None if it can: a folder
    must hold `filename`; a hub name is looked up in the local Hugging Face cache first, then asked of the hub once,
    with a short timeout (transformers itself retries for about a minute before it gives up)."""
    if os.path.isdir(name):
        return None if os.path.isfile(os.path.join(name, filename)) else f"the folder {name} holds no {filename}"
    if not is_hub_name(name):
        return f"no folder {name}"
    import huggingface_hub  # imported here: importing runtime.py stays cheap
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    if isinstance(huggingface_hub.try_to_load_from_cache(name, filename), str):
        return None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "not in the local Hugging Face cache, and the hub is off (HF_HUB_OFFLINE)"
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(name, filename), timeout=hub_timeout)
    except EntryNotFoundError:
        return f"the hub's {name} has no {filename}"
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face hub (or it is private: log in with `hf auth login`)"
    except Exception as e:  # no network, proxy, timeout: whatever it is, the hub could not be reached
        return f"not in the local Hugging Face cache and the hub could not be reached ({type(e).__name__})"
    return None


def git_sha() -> str:
    """The commit this code runs from, for checkpoints and logs ("unknown" outside a git checkout)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
