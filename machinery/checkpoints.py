"""Checkpoints: written atomically, read safely, resumed exactly.

  files       write_atomic, save_atomic (never half-written, a full disk said so), read_checkpoint (plain data only)
  training    FORMAT_VERSION, check_format, save_run / resume_run (weights, optimizer, scaler, every rank's RNG
              streams), resume_configs (the checkpoint's settings, with only the flags that may change on top)
"""

import argparse
import contextlib
import dataclasses
import errno
import os
import pickle
import re
import subprocess
import tempfile
from collections.abc import Callable

import torch

from machinery.flags import UsageError
from machinery.runtime import print0, restore_rng, rng_states, sync_buffers

# -----------------------------------------------------------------------------
# files


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) into a temp file of its own next to path (two writers never share one), fsync it, then os.replace
    it onto path and fsync the folder: a crash or a full disk never leaves a half-written file, and the previous one
    stays as it was. A full disk is reported as such, naming the file; the temp file is removed."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch reports a failed write as a RuntimeError whose context is the OSError (or, writing to a path
        # itself, as "basic_ios::clear: iostream error" with no errno at all)
        if any(getattr(x, "errno", None) == errno.ENOSPC for x in (e, e.__cause__, e.__context__)):
            kept = "the previous file is intact" if os.path.exists(path) else "nothing was written"
            raise OSError(errno.ENOSPC, f"no space left writing {path}; {kept}") from e
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def save_atomic(obj: dict, path: str) -> None:
    """torch.save(obj) to path with write_atomic: a checkpoint is never half-written."""
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


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


# -----------------------------------------------------------------------------
# training state

# train.py's checkpoints: {model, optimizer, scaler, rng, git_sha, train_config, data_config, model_config,
# world_config (the synthetic world's settings, None on a benchmark), step, epoch, best_metric, teacher (name and
# sha256), format_version}. Only this format is read; a file of another is refused, naming the commit that wrote it.
FORMAT_VERSION = 4


def check_format(ckpt: dict, path: str, flag: str = "") -> None:
    """A checkpoint of train.py in this format, or a UsageError saying which format and commit wrote it."""
    if ckpt.get("format_version") != FORMAT_VERSION:
        sha = ckpt.get("git_sha", "unknown")
        raise UsageError(f"{flag + ' ' if flag else ''}{path}: written by a train.py of checkpoint format "
                         f"{ckpt.get('format_version')} (git {sha}), from before this code's first release; this one "
                         f"reads format {FORMAT_VERSION}. Evaluate or resume it with the code that wrote it (git "
                         f"checkout {sha}), or train it again")


def save_run(run, name: str, step: int, best: float) -> None:
    """<out_dir>/name: a checkpoint a run can resume from exactly, as plain data (weights_only=True loads it), written
    atomically by rank 0 (run: train.Run). The student (unwrapped, uncompiled), optimizer, scaler, every rank's RNG
    streams, the git sha, the configs, the step and the best val Acc@0.5, the teacher's name and hash: a trainable
    teacher's weights go beside it (name + ".teacher"), never inside the student's. Every rank must call it (they
    gather RNG states)."""
    teacher, env, path = run.teacher, run.env, os.path.join(run.cfg.out_dir, name)
    sync_buffers(run.raw_model, env)
    rng = rng_states(env)  # every rank's dropout stream: a resumed run continues each of them
    if env.is_master:
        save_atomic({"model": run.raw_model.state_dict(), "optimizer": run.optimizer.state_dict(),
                     "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None, "rng": rng,
                     "git_sha": git_sha(), **run.configs, "step": step, "epoch": step // run.steps_per_epoch,
                     "best_metric": best, "format_version": FORMAT_VERSION,
                     "teacher": None if teacher is None else {"name": teacher.name, "sha256": teacher.weights_sha256}},
                    path)
        if teacher is not None and teacher.trainable:
            save_atomic({"model": teacher.model.state_dict()}, path + ".teacher")


def resume_run(run) -> tuple[int, float]:
    """Restore what save_run wrote at --resume into run (train.Run): weights, optimizer, scaler, this rank's RNG
    streams, a trainable teacher's weights from beside it; returns (step, best val Acc@0.5)."""
    cfg, teacher = run.cfg, run.teacher
    ckpt = read_checkpoint(cfg.resume, "--resume")
    run.raw_model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], run.env)
    if teacher is not None and teacher.trainable:  # its weights were saved beside the student's
        teacher.model.load_state_dict(read_checkpoint(cfg.resume + ".teacher")["model"])
    step, best = ckpt["step"], ckpt["best_metric"]
    print0(f"resumed from {cfg.resume} at step {step} (epoch {step // run.steps_per_epoch}), best {best:.2f}")
    if cfg.epochs != ckpt["train_config"]["epochs"]:
        print0(f"--epochs {cfg.epochs}: the run, {ckpt['train_config']['epochs']} epochs long so far, continues to "
               f"step {run.total_steps} with the lr schedule of {cfg.epochs} epochs ({cfg.lr_schedule})")
    return step, best


def git_sha() -> str:
    """The commit this code runs from, for checkpoints and logs ("unknown" outside a git checkout)."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# What a resumed run may change: where and how fast it runs, when it stops and evaluates. Anything else would make
# it a different run than the one it continues. --epochs may grow: the lr is a pure function of the step
# (train.lr_factor), so the run goes on with the longer schedule.
RESUME_MAY_CHANGE = {"resume", "max_steps", "out_dir", "device", "dtype", "compile", "channels_last", "num_workers",
                     "micro_batch", "eval_every", "eval_batch", "final_eval", "checkpoint_dir", "save_every", "epochs",
                     "dry_run"}
CONFIG_KEYS = ("train_config", "data_config", "model_config", "world_config")  # the order of train.py's configs


def resume_configs(configs: list, argv: list[str], path: str) -> list:
    """--resume path continues the checkpoint's run: its configs, with the flags given now on top if they may change.
    configs: train.py's [TrainConfig, DataConfig, ModelConfig, WorldConfig or None] as parsed; returns the same,
    resumed (the world's settings None when the run is on a benchmark)."""
    from machinery.interop import checkpoint_kind  # imported here: it imports the model

    ckpt = read_checkpoint(path, "--resume")
    if "train_config" not in ckpt:
        what = {"qrnet": "an official QRNet checkpoint", "transvg": "an official TransVG checkpoint",
                "detr": "a DETR checkpoint"}.get(checkpoint_kind(ckpt), "a model without its training state")
        raise UsageError(f"--resume {path}: {what}, not a last.pt of train.py, so there is no run to continue. "
                         f"Evaluate it with `python evaluate.py --ckpt {path}`, or start a new run from its visual "
                         f"branch with --visual_init {path}")
    check_format(ckpt, path, "--resume")
    saved = [ckpt[key] for key in CONFIG_KEYS]
    given = {a[2:].split("=", 1)[0] for a in argv if a.startswith("--")}
    if saved[3] is not None and configs[3] is None:  # --dataset <a benchmark> given for a run on the world
        raise UsageError(f"--resume {path}: dataset {saved[1]['dataset']!r} -> {configs[1].dataset!r}: a resumed run "
                         f"continues its checkpoint's run; start a new run (--out_dir) to change it")
    cfg, *rest = merge_resumed(configs, saved, given, RESUME_MAY_CHANGE, f"--resume {path}")
    if cfg.epochs < saved[0]["epochs"]:
        raise UsageError(f"--epochs {cfg.epochs}: the run of --resume {path} is {saved[0]['epochs']} epochs long; a "
                         f"resumed run can train longer, not shorter (--max_steps stops it early)")
    if "out_dir" not in given:  # the run goes on where its checkpoint is, wherever the folder has moved since
        cfg = dataclasses.replace(cfg, out_dir=os.path.dirname(path) or ".")
    return [cfg, *rest]


def merge_resumed(configs: list, saved: list[dict | None], given: set[str], may_change: set[str], what: str) -> list:
    """The configs a resumed run continues with: each saved config (a dict of the same dataclass as configs[i]; None:
    the run had none), with the fields named in `given` (the flags on the command line) taken from configs, if they
    may change. Any other given field that differs is an error naming it (`what` says which checkpoint)."""
    olds = [None if s is None else type(c)(**s) for c, s in zip(configs, saved)]
    new = {k: v for c in configs if c is not None for k, v in dataclasses.asdict(c).items()}
    old = {k: v for c in olds if c is not None for k, v in dataclasses.asdict(c).items()}

    def same(k: str) -> bool:  # a saved dict field (BERT's resolved config) may be given in part by the flag
        if isinstance(new[k], dict) and isinstance(old[k], dict):
            return all(old[k].get(key) == value for key, value in new[k].items())
        return new[k] == old[k]

    changed = sorted(k for k in given - may_change if k in new and k in old and not same(k))
    if changed:
        raise UsageError(f"{what}: {', '.join(f'{k} {old[k]!r} -> {new[k]!r}' for k in changed)}: a resumed run "
                         f"continues its checkpoint's run, so only {sorted(may_change)} may change; start a new run "
                         f"(--out_dir) to change the rest")
    return [None if o is None else dataclasses.replace(o, **{k: new[k] for k in given & set(dataclasses.asdict(o))
                                                          if k in may_change}) for o in olds]
