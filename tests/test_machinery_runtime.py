"""machinery/runtime.py: precision names, the device, and the data order (a pure function of seed, epoch and rank).

Run: python -m pytest -q tests/test_machinery_runtime.py
"""
import pytest
import torch

import evaluate
from machinery import runtime
from machinery.flags import UsageError
from machinery.runtime import EpochSeeded, amp_dtype, epoch_indices
from tools import bench
from train import TrainConfig


def test_precision_names_and_their_short_forms():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu, "auto") is None and amp_dtype(cpu, "float32") is None and amp_dtype(cpu, "fp32") is None
    assert amp_dtype(cuda, "bf16") == amp_dtype(cuda, "bfloat16") == torch.bfloat16  # no GPU needed to name it
    assert amp_dtype(cuda, "fp16") == torch.float16 and amp_dtype(cuda, "float32") is None
    with pytest.raises(ValueError, match="needs CUDA"):
        amp_dtype(cpu, "bf16")
    for config in (TrainConfig, evaluate.EvalConfig, bench.BenchConfig):  # each script's --dtype, checked when read
        with pytest.raises(UsageError, match="--dtype: expected one of auto, float32, bfloat16, float16, fp32, bf16, "
                                             "fp16, got 'half'"):
            config(dtype="half")


def test_auto_precision_takes_bf16_only_where_the_gpu_has_it_not_where_torch_emulates_it(monkeypatch):
    # a V100 or T4 (sm70/75): torch.cuda.is_bf16_supported() is True by default there, as bf16 runs emulated
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype(torch.device("cuda"), "auto") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # Ampere and later
    assert amp_dtype(torch.device("cuda"), "auto") == torch.bfloat16


def test_every_scripts_device_is_checked_when_its_flags_are_read():
    for config in (TrainConfig, evaluate.EvalConfig, bench.BenchConfig):
        with pytest.raises(UsageError, match="--device: expected auto, cpu, cuda or mps, got 'foo'"):
            config(device="foo")
        assert config(device="cuda:1").device == "cuda:1"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_device_the_machine_lacks_is_refused_with_what_to_pass():
    with pytest.raises(UsageError, match=r"--device cuda: this machine has no CUDA GPU .*; pass --device cpu"):
        runtime.setup_device("cuda")


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


def test_an_unaugmented_dataset_is_read_as_it_is_without_seeding(monkeypatch):
    class Fixed(torch.utils.data.Dataset):
        train = False  # what data.GroundingDataset and cache.CachedVisual say when nothing is random

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return float(i)

    monkeypatch.setattr(torch.random, "fork_rng", lambda *a, **k: pytest.fail("an unaugmented sample was seeded"))
    assert [EpochSeeded(Fixed(), seed=3)[i] for i in range(4)] == [0.0, 1.0, 2.0, 3.0]
