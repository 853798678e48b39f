"""files.py: checkpoints never half-written, a full disk said so, one run per folder, refusals before anything is made.

Run: python -m pytest -q tests/test_files.py
"""
import errno
import os

import pytest
import torch

import files
from files import read_checkpoint
from flags import UsageError


def test_save_atomic_syncs_file_and_folder_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    files.save_atomic({"step": 1}, path)
    synced, fsync = [], os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    files.save_atomic({"step": 2}, path)
    assert synced[0].startswith(path + ".") and synced[0].endswith(".tmp")  # the data, before the rename
    assert synced[1] == str(tmp_path)  # then the folder, so that the rename itself is on the disk
    assert torch.load(path, weights_only=True) == {"step": 2} and os.listdir(tmp_path) == ["last.pt"]


def test_disk_full_names_the_file_keeps_the_old_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    files.save_atomic({"step": 1}, path)

    def full_disk(obj, f):
        f.write(b"x" * 1000)  # a part of it made it to the disk
        raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.torch, "save", full_disk)
    with pytest.raises(OSError, match=f"no space left writing {path}; the previous checkpoint is intact"):
        files.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]
    with pytest.raises(OSError, match="nothing was written"):
        monkeypatch.setattr(files.torch, "save", full_disk)
        files.save_atomic({"step": 2}, str(tmp_path / "best.pt"))


def test_a_run_folder_takes_one_run_at_a_time_and_loses_stale_temp_files(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt.x1y2.tmp").write_bytes(b"half a checkpoint from a killed run")
    lock = files.lock_run_dir(str(tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt.x1y2.tmp").exists()
    with pytest.raises(files.UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        files.lock_run_dir(str(tmp_path / "run"))
    lock.close()  # what the OS does when the holder dies, even by kill -9
    files.lock_run_dir(str(tmp_path / "run")).close()


def test_run_folder_refusals_are_checked_without_creating_anything(tmp_path):
    files.check_run_dir(str(tmp_path / "new" / "run"))  # a folder to be made: fine, and not made yet
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="--out_dir .*file is a file, not a folder"):
        files.check_run_dir(str(tmp_path / "file"))
    with pytest.raises(UsageError, match="--out_dir .*file/run: cannot create or write it"):
        files.check_run_dir(str(tmp_path / "file" / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_text("x")
    with pytest.raises(UsageError, match=r"--out_dir .*run holds a run \(last.pt\): pass --resume"):
        files.check_run_dir(str(tmp_path / "run"))
    files.check_run_dir(str(tmp_path / "run"), resume=str(tmp_path / "run" / "last.pt"))
    files.check_run_dir(str(tmp_path / "run"), overwrite=True)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    lock = files.lock_run_dir(str(tmp_path / "run"))
    try:
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            files.check_run_dir(str(tmp_path / "run"), overwrite=True)
    finally:
        lock.close()
    assert files.lock_holder(str(tmp_path / "run")) is None and before == ["last.pt"]


class Payload:  # an arbitrary class: unpickling it would run code we do not trust
    pass


def test_checkpoints_with_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(UsageError, match=r"evil.pth: holds a Python object of class \S*Payload, not only tensors "
                                         r"and plain data; it is never unpickled"):
        read_checkpoint(str(path))
