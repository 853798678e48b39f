"""What a run writes and reads: checkpoints written atomically and read safely, run folders that hold one run each.

Contents
  checkpoints    save_atomic (never half-written, a full disk said so), write_atomic (any other file),
                 read_checkpoint (weights_only: tensors and plain data, nothing unpickled), save_training_state /
                 load_training_state (an exact resume: weights, optimizer, scaler, every rank's RNG streams), git_sha
  run folders    holds_run, lock_holder, check_run_dir (the refusals, checked before anything is created),
                 lock_run_dir, claim_run_dir: a run never writes over another, and two runs never share a folder
"""

import argparse
import contextlib
import errno
import fcntl
import itertools
import os
import pickle
import re
import subprocess
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist

from flags import UsageError
from runtime import DeviceEnv, print0, restore_rng, rng_states, sync_buffers

# -----------------------------------------------------------------------------
# checkpoints


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


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) into a temp file next to path, then os.replace it onto path: never a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_checkpoint(path: str, flag: str = "") -> dict:
    """torch.load with weights_only=True; argparse.Namespace (pickled by DETR/TransVG) is the one class allowed.
    A file that is missing, not a checkpoint, or holds other Python objects is a UsageError naming it (after
    `flag`, the option that gave it, e.g. "--resume"): one line, without torch's advice to unpickle it anyway."""
    what = f"{flag} {path}" if flag else path
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no such checkpoint file" if not os.path.isdir(path) else
                         f"{what} is a folder; give the checkpoint file in it (e.g. {os.path.join(path, 'last.pt')})")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text: a paragraph on weights_only, then "WeightsUnpickler error: "
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise UsageError(f"{what}: holds a Python object of class {found[1]}, not only tensors and plain data; it is "
                         f"never unpickled (that could run any code)" if found else
                         f"{what}: not a PyTorch checkpoint (torch.load cannot read it)") from None
    except Exception as e:  # zip errors, or whatever torch's unpickler trips on in bytes that are no pickle
        damaged = "zip archive" in str(e)  # torch.save's format is a zip: a truncated or partly copied file
        raise UsageError(f"{what}: not a PyTorch checkpoint (torch.load cannot read it)" if not damaged else
                         f"{what}: a damaged PyTorch checkpoint (torch.load cannot read its zip archive: truncated, or "
                         f"partly copied?)") from None
    if not isinstance(ckpt, dict):
        raise UsageError(f"{what}: expected a dict checkpoint, got {type(ckpt).__name__}")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def save_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, env: DeviceEnv, extra: dict) -> None:
    """A checkpoint a run can resume from exactly, as plain data (weights_only=True loads it), written atomically
    by rank 0: model (unwrapped, uncompiled), optimizer, scaler, every rank's RNG streams, the git sha, and extra.
    Every rank must call it (they gather RNG states)."""
    sync_buffers(model, env)
    rng = rng_states(env)  # every rank's dropout stream: a resumed run continues each of them
    if env.is_master:
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rng, "git_sha": git_sha(),
                     **extra}, path)


def load_training_state(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scaler: torch.amp.GradScaler, env: DeviceEnv) -> dict:
    """Restore what save_training_state wrote, this rank's RNG streams included; returns the checkpoint."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] is not None:
        scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], env)
    return ckpt


def git_sha() -> str:
    """The commit this code runs from, for checkpoints and logs ("unknown" outside a git checkout)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# -----------------------------------------------------------------------------
# run folders

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
