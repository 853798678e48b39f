"""runtime.py: the dataclass command line every script shares, precision names, resume merging, data order.

Run: python -m pytest -q tests/test_runtime.py
"""
import dataclasses
import errno
import os

import pytest
import torch

import bench
import data
import runtime
import train
from runtime import EpochSeeded, amp_dtype, epoch_indices, merge_resumed, parse_config

TRAIN_TYPES = [train.TrainConfig, data.DataConfig, train.ModelConfig]


def test_flags_take_both_forms_convert_types_and_apply_presets():
    cfg, dcfg, mcfg = parse_config(["--dataset", "refcoco+", "--lr=1", "--teacher_trainable", "--backbone",
                                    "resnet101", "--augment=false"], TRAIN_TYPES, train.preset)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.teacher_trainable and not cfg.augment
    assert (dcfg.dataset, cfg.epochs, cfg.lr_drop, mcfg.backbone, mcfg.visual_init) == (
        "refcoco+", 180, 120, "resnet101", "detr")
    cfg, _, mcfg = parse_config(["--dataset=refcocog", "--max_query_len=30"], TRAIN_TYPES, train.preset)
    assert (cfg.epochs, mcfg.max_query_len) == (90, 30)  # the flag beats the preset's 40


def test_dict_fields_take_json():
    _, _, mcfg = parse_config(['--text_config={"hidden_size": 64}'], TRAIN_TYPES, train.preset)
    assert mcfg.text_config == {"hidden_size": 64}


@pytest.mark.parametrize("argv,message", [(["--epochs=1e4"], "invalid int"), (["--lr", "fast"], "invalid float"),
                                          (["--no_such_key=1"], "unrecognized"), (["--augment=maybe"], "true/false")])
def test_bad_flags_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv, TRAIN_TYPES, train.preset)
    assert message in capsys.readouterr().err


def test_help_lists_every_field_with_its_comment_and_the_presets_value(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = capsys.readouterr().out
    for cls in TRAIN_TYPES:
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in out, f.name
    assert "ResNet and DETR encoder" in out  # a trailing comment became help text
    assert "(default: resnet18)" in out  # --backbone under the default dataset's preset (shapes), not resnet50


def test_bench_speaks_the_same_dialect(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"--{f.name}" in out for f in dataclasses.fields(bench.BenchConfig))
    with pytest.raises(SystemExit):
        bench.main(["--batch_size=two"])
    assert "invalid int" in capsys.readouterr().err


def test_precision_names_and_their_short_forms():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "float32") is None and amp_dtype(cpu, "fp32") is None
    assert amp_dtype(cuda, "bf16") == amp_dtype(cuda, "bfloat16") == torch.bfloat16  # no GPU needed to name it
    assert amp_dtype(cuda, "fp16") == torch.float16 and amp_dtype(cuda, "float32") is None
    with pytest.raises(ValueError, match="needs CUDA"):
        amp_dtype(cpu, "bf16")
    with pytest.raises(ValueError, match="half"):
        amp_dtype(cpu, "half")


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
    with pytest.raises(runtime.UsageError, match=r"--resume x: lr 0.5 -> 2.0"):
        merge_resumed([A(lr=2.0)], saved, {"lr"}, {"device"}, "--resume x")


def test_epoch_indices_split_each_global_batch_over_ranks():
    both = [epoch_indices(10, epoch=3, seed=1, rank=r, world=2, batch_size=4) for r in range(2)]
    single = epoch_indices(10, epoch=3, seed=1, rank=0, world=1, batch_size=4)
    assert len(single) == 8 and torch.equal(torch.cat([both[0][:2], both[1][:2], both[0][2:], both[1][2:]]), single)
    assert not torch.equal(single, epoch_indices(10, epoch=4, seed=1, rank=0, world=1, batch_size=4))


def test_augmentation_is_a_function_of_seed_epoch_and_index_not_of_the_draw_order():
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(())

    ds = EpochSeeded(Noise(), seed=3)
    forward = [ds[i] for i in range(4)]
    torch.manual_seed(123)  # the global stream (dropout's) neither matters nor moves
    state = torch.get_rng_state()
    assert [ds[i] for i in reversed(range(4))] == forward[::-1]
    assert torch.equal(torch.get_rng_state(), state)
    ds.epoch = 1
    assert [ds[i] for i in range(4)] != forward


# -----------------------------------------------------------------------------
# files: checkpoints never half-written, one run per folder


def test_save_atomic_syncs_file_and_folder_and_leaves_no_temp_files(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    runtime.save_atomic({"step": 1}, path)
    synced, fsync = [], os.fsync
    monkeypatch.setattr(runtime.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or fsync(fd))
    runtime.save_atomic({"step": 2}, path)
    assert synced[0].startswith(path + ".") and synced[0].endswith(".tmp")  # the data, before the rename
    assert synced[1] == str(tmp_path)  # then the folder, so that the rename itself is on the disk
    assert torch.load(path, weights_only=True) == {"step": 2} and os.listdir(tmp_path) == ["last.pt"]


def test_disk_full_names_the_file_keeps_the_old_checkpoint_and_cleans_up(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    runtime.save_atomic({"step": 1}, path)

    def full_disk(obj, f):
        f.write(b"x" * 1000)  # a part of it made it to the disk
        raise RuntimeError("unexpected pos") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.torch, "save", full_disk)
    with pytest.raises(OSError, match=f"no space left writing {path}; the previous checkpoint is intact"):
        runtime.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]
    with pytest.raises(OSError, match="nothing was written"):
        monkeypatch.setattr(runtime.torch, "save", full_disk)
        runtime.save_atomic({"step": 2}, str(tmp_path / "best.pt"))


def test_a_run_folder_takes_one_run_at_a_time_and_loses_stale_temp_files(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt.x1y2.tmp").write_bytes(b"half a checkpoint from a killed run")
    lock = runtime.lock_run_dir(str(tmp_path / "run"))
    assert not (tmp_path / "run" / "last.pt.x1y2.tmp").exists()
    with pytest.raises(runtime.UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
        runtime.lock_run_dir(str(tmp_path / "run"))
    lock.close()  # what the OS does when the holder dies, even by kill -9
    runtime.lock_run_dir(str(tmp_path / "run")).close()


# -----------------------------------------------------------------------------
# user errors: one message, exit status 2, checked before anything is created


def test_cli_says_a_usage_error_once_and_exits_2_but_a_bug_keeps_its_traceback(capsys, monkeypatch):
    def refused():
        raise runtime.UsageError("--lr 7: too high")

    with pytest.raises(SystemExit) as info:
        runtime.cli(refused)
    assert info.value.code == 2 and capsys.readouterr().err == "error: --lr 7: too high\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun, rank 0 alone says it; every rank exits
    with pytest.raises(SystemExit) as info:
        runtime.cli(refused)
    assert info.value.code == 2 and capsys.readouterr().err == ""

    def bug():
        raise KeyError("a bug")
    with pytest.raises(KeyError):  # not caught: its traceback is what a developer needs
        runtime.cli(bug)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_device_the_machine_lacks_is_refused_with_what_to_pass():
    with pytest.raises(runtime.UsageError, match=r"--device cuda: this machine has no CUDA GPU .*; pass --device cpu"):
        runtime.setup_device("cuda")


def test_run_folder_refusals_are_checked_without_creating_anything(tmp_path):
    runtime.check_run_dir(str(tmp_path / "new" / "run"))  # a folder to be made: fine, and not made yet
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(runtime.UsageError, match="--out_dir .*file is a file, not a folder"):
        runtime.check_run_dir(str(tmp_path / "file"))
    with pytest.raises(runtime.UsageError, match="--out_dir .*file/run: cannot create or write it"):
        runtime.check_run_dir(str(tmp_path / "file" / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_text("x")
    with pytest.raises(runtime.UsageError, match=r"--out_dir .*run holds a run \(last.pt\): pass --resume"):
        runtime.check_run_dir(str(tmp_path / "run"))
    runtime.check_run_dir(str(tmp_path / "run"), resume=str(tmp_path / "run" / "last.pt"))
    runtime.check_run_dir(str(tmp_path / "run"), overwrite=True)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    lock = runtime.lock_run_dir(str(tmp_path / "run"))
    try:
        with pytest.raises(runtime.UsageError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            runtime.check_run_dir(str(tmp_path / "run"), overwrite=True)
    finally:
        lock.close()
    assert runtime.lock_holder(str(tmp_path / "run")) is None and before == ["last.pt"]


def test_find_pretrained_looks_on_disk_then_in_the_cache_then_asks_the_hub_once(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n")
    assert runtime.find_pretrained(str(tmp_path / "bert"), "vocab.txt") is None
    assert runtime.find_pretrained(str(tmp_path / "bert")) == f"the folder {tmp_path / 'bert'} holds no config.json"
    assert runtime.find_pretrained(str(tmp_path / "typo")) == f"no folder {tmp_path / 'typo'}"
    assert "hub is off (HF_HUB_OFFLINE)" in runtime.find_pretrained("nobody/no-such-bert")  # conftest: offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def unreachable(url, timeout):
        asked.append(timeout)
        raise ConnectionError("no route to host")
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    assert runtime.find_pretrained("nobody/no-such-bert") == ("not in the local Hugging Face cache and the hub could "
                                                              "not be reached (ConnectionError)")
    assert asked == [5.0]  # once, with a short timeout
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda name, filename: "/cache/config.json")
    assert runtime.find_pretrained("nobody/no-such-bert") is None and len(asked) == 1  # cached: the hub not asked
