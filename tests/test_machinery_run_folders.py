"""machinery/run_folders.py: one run per folder, locked while it runs, refusals before anything is made.

Run: python -m pytest -q tests/test_machinery_run_folders.py
(What train.py does with them, a folder that holds a run refused, the next free one taken: tests/test_train.py.)
"""
import os

import pytest

from machinery import run_folders
from machinery.flags import UsageError


def test_a_run_folder_takes_one_run_at_a_time_and_loses_stale_temp_files(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt.x1y2.tmp").write_bytes(b"half a checkpoint from a killed run")
    lock = run_folders.lock_run_dir(str(tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt.x1y2.tmp").exists()
    with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        run_folders.lock_run_dir(str(tmp_path / "run"))
    lock.close()  # what the OS does when the holder dies, even by kill -9
    run_folders.lock_run_dir(str(tmp_path / "run")).close()


def test_run_folder_refusals_are_checked_without_creating_anything(tmp_path):
    run_folders.check_run_dir(str(tmp_path / "new" / "run"))  # a folder to be made: fine, and not made yet
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="--out_dir .*file is a file, not a folder"):
        run_folders.check_run_dir(str(tmp_path / "file"))
    with pytest.raises(UsageError, match="--out_dir .*file/run: cannot create or write it"):
        run_folders.check_run_dir(str(tmp_path / "file" / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_text("x")
    with pytest.raises(UsageError, match=r"--out_dir .*run holds a run \(last.pt\): pass --resume"):
        run_folders.check_run_dir(str(tmp_path / "run"))
    run_folders.check_run_dir(str(tmp_path / "run"), resume=str(tmp_path / "run" / "last.pt"))
    run_folders.check_run_dir(str(tmp_path / "run"), overwrite=True)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    lock = run_folders.lock_run_dir(str(tmp_path / "run"))
    try:
        with pytest.raises(UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            run_folders.check_run_dir(str(tmp_path / "run"), overwrite=True)
    finally:
        lock.close()
    assert run_folders.lock_holder(str(tmp_path / "run")) is None and before == ["last.pt"]
