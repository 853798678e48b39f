"""Smoke tests of bench.py: each section runs and reports numbers (no speed is asserted here).

Run: python -m pytest -q tests/test_bench.py
"""

import torch

import bench


def test_data_section_runs_and_restores_threads():
    threads = torch.get_num_threads()
    out = bench.main(["--data", "--n", "3", "--passes", "1", "--imsize", "64"])["data"]
    assert out["train"] > 0 and out["eval"] > 0 and out["threads"] == 1
    assert torch.get_num_threads() == threads
