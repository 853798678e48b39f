"""machinery/checkpoints.py: checkpoints never half-written, a full disk said so, nothing but plain data read, other
formats refused naming the commit that wrote them; a resumed run continues with its checkpoint's settings.

Run: python -m pytest -q tests/test_machinery_checkpoints.py
(Bit-exact resumes of real runs: tests/test_train.py.)
"""
import dataclasses
import errno
import os

import pytest
import torch

from machinery import checkpoints
from machinery.checkpoints import check_format, merge_resumed, read_checkpoint
from machinery.flags import UsageError


def test_save_atomic_syncs_file_and_folder_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoints.save_atomic({"step": 1}, path)
    synced, fsync = [], os.fsync
    monkeypatch.setattr(checkpoints.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    checkpoints.save_atomic({"step": 2}, path)
    assert synced[0].startswith(path + ".") and synced[0].endswith(".tmp")  # the data, before the rename
    assert synced[1] == str(tmp_path)  # then the folder, so that the rename itself is on the disk
    assert torch.load(path, weights_only=True) == {"step": 2} and os.listdir(tmp_path) == ["last.pt"]


def test_disk_full_names_the_file_keeps_the_old_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoints.save_atomic({"step": 1}, path)

    def full_disk(obj, f):
        with open(f, "wb") as partial:
            partial.write(b"x" * 1000)  # a part of it made it to the disk
        raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(OSError, match=f"no space left writing {path}; the previous file is intact"):
        checkpoints.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]
    with pytest.raises(OSError, match="nothing was written"):
        monkeypatch.setattr(checkpoints.torch, "save", full_disk)
        checkpoints.save_atomic({"step": 2}, str(tmp_path / "best.pt"))


class Payload:  # an arbitrary class: unpickling it would run code we do not trust
    pass


def test_checkpoints_with_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": Payload()}, path)
    with pytest.raises(UsageError, match=r"evil.pth: holds a Python object of class \S*Payload, not only tensors "
                                         r"and plain data; it is never unpickled"):
        read_checkpoint(str(path))


def test_only_this_format_is_read_and_an_older_file_says_which_commit_wrote_it():
    check_format({"format_version": checkpoints.FORMAT_VERSION}, "last.pt")
    with pytest.raises(UsageError, match=r"--resume old.pt: written by a train.py of checkpoint format 3 \(git abc\), "
                                         r"from before this code's first release; .*git checkout abc"):
        check_format({"format_version": 3, "git_sha": "abc"}, "old.pt", "--resume")


def test_resumed_configs_take_only_the_flags_that_may_change():
    @dataclasses.dataclass
    class A:
        lr: float = 1.0
        device: str = "cpu"
        table: dict | None = None

    saved = [{"lr": 0.5, "device": "cuda", "table": {"a": 1, "b": 2}}]
    resumed, = merge_resumed([A(lr=0.5, device="cpu", table={"a": 1})], saved, {"device", "table", "lr"},
                             {"device"}, "--resume x")
    assert resumed == A(lr=0.5, device="cpu", table={"a": 1, "b": 2})  # a part of a saved dict given: the same
    with pytest.raises(UsageError, match=r"--resume x: lr 0.5 -> 2.0"):
        merge_resumed([A(lr=2.0)], saved, {"lr"}, {"device"}, "--resume x")
    # a config the run had not (the synthetic world's, for a run on a benchmark) stays out, its flags with it

    @dataclasses.dataclass
    class World:
        size: int = 3

    assert merge_resumed([A(lr=0.5), World(size=8)], [saved[0], None], {"lr", "size"}, set(), "--resume x") == [
        A(**saved[0]), None]
