"""Run folders: a run never writes over another, and two runs never share a folder.

    out_dir, lock = claim_run_dir(cfg.out_dir, "out/<dataset>", cfg.resume, cfg.overwrite, env)   # train.py

check_run_dir says the refusals before anything is created (preflight calls it); lock_run_dir holds a folder for as
long as its run lives; claim_run_dir takes the given folder, or the first free of out/<dataset>, _2, _3, ...
"""

import contextlib
import fcntl
import itertools
import os

import torch.distributed as dist

from machinery.flags import UsageError
from machinery.runtime import DeviceEnv, print0

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
