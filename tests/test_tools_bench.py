"""tools/bench.py: each section runs and reports numbers (no speed is asserted here), and it speaks the flags' dialect.

Run: python -m pytest -q tests/test_tools_bench.py
"""
import dataclasses

import pytest
import torch

from tools import bench


def test_data_section_runs_and_restores_threads():
    threads = torch.get_num_threads()
    out = bench.main(["--data", "--n", "3", "--passes", "1", "--imsize", "64"])["data"]
    assert out["train"] > 0 and out["eval"] > 0 and out["threads"] == 1
    assert torch.get_num_threads() == threads


def test_the_toy_qrnet_step_says_where_it_goes(tmp_path, capsys):
    out = bench.main(["--backbone", "swin_toy_qrnet", "--batch_size", "4", "--warmup", "0", "--reps", "1",
                      "--device", "cpu", f"--teacher_name={tmp_path / 'none'}"])  # no toy CLIP: a random one
    parts = out["parts_s"]  # the preset's defaults: the teacher and the breakdown are on
    assert set(parts) == {"Swin (blocks, patch embedding and merging, stage norms)", "AdamW update",
                          "QD-ATT (after each stage and in the neck)", "teacher (no gradient)",
                          "neck (lateral convs, top-down and bottom-up sums)", "fusion (+ BERT, projections, box head)"}
    # the neck's line is its time less its QD-ATT's, each timed once here: only it may come out at noise level
    assert all(v > 0 for k, v in parts.items() if not k.startswith("neck")) and out["train_s"] > 0
    printed = capsys.readouterr().out
    assert "swin_toy_qrnet, batch 4" in printed and "where the train step goes" in printed


def test_bench_speaks_the_same_dialect(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"--{f.name}" in out for f in dataclasses.fields(bench.BenchConfig))
    with pytest.raises(SystemExit):
        bench.main(["--batch_size=two"])
    assert "invalid int" in capsys.readouterr().err
