"""tools/gap.py: the modality-gap measures and picture on hand-made features, and evaluate.py --modality_gap.

Run: python -m pytest -q tests/test_tools_gap.py
"""
import json
import math

import pytest
import torch
from torchvision.io import read_image

import data
import evaluate
from machinery.flags import UsageError
from tools import gap


def test_centroid_gap_by_hand():
    visual, text = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert gap.centroid_gap(visual, text) == pytest.approx(math.sqrt(2))
    assert gap.centroid_gap(visual, -visual) == pytest.approx(2.0)  # the largest possible
    assert gap.centroid_gap(visual, visual) == 0.0
    # measured on unit vectors: scaling one modality's rows changes nothing; centroids (1,0) and (0.5,0.5)
    assert gap.centroid_gap(5 * visual, torch.tensor([[0.0, 3.0], [0.1, 0.0]])) == pytest.approx(math.sqrt(0.5))


def test_matched_and_mismatched_cosines_by_hand():
    visual, text = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    # cos(v0,t0) = 1, cos(v1,t1) = 1/sqrt2; cos(v0,t1) = 1/sqrt2, cos(v1,t0) = 0
    matched, mismatched = gap.paired_cosines(visual, text)
    assert matched == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert mismatched == pytest.approx((1 / math.sqrt(2) + 0) / 2)
    with pytest.raises(ValueError, match="at least 2 samples"):
        gap.paired_cosines(visual[:1], text[:1])


def test_features_of_different_widths_are_refused():
    with pytest.raises(ValueError, match=r"same width.*\(4, 32\) and \(4, 64\)"):
        gap.gap_measures(torch.randn(4, 32), torch.randn(4, 64))


def test_probe_separates_two_clusters_and_not_one_distribution():
    g = torch.Generator().manual_seed(0)
    e = torch.eye(16)
    visual, text = e[0] + 0.1 * torch.randn(400, 16, generator=g), e[1] + 0.1 * torch.randn(400, 16, generator=g)
    assert gap.modality_probe(visual, text) == 100.0
    # two independent draws of one distribution: 2 x 1000 held-out rows, so chance gives 50 +- 1.1 (one sd)
    v, t = torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)
    assert abs(gap.modality_probe(v, t) - 50) < 5
    assert gap.modality_probe(v, v) == 50.0  # the very same rows: each held-out pair is one right, one wrong
    # scored on the held-out half: 20 training pairs in 64 dimensions are separable by chance alone (100 % if the
    # probe were scored on them), 20 unseen ones stay near chance (50 +- 8)
    assert gap.modality_probe(torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g)) < 80
    assert gap.modality_probe(v, t) == gap.modality_probe(v.clone(), t.clone())  # deterministic


def test_pca_2d_recovers_a_line_and_axis_aligned_points():
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(6, generator=g), dim=0)
    s = torch.linspace(-3, 5, 50)
    line = s[:, None] * direction + torch.randn(6, generator=g)  # (50,6) points on one line
    xy = gap.pca_2d(line)
    assert xy.shape == (50, 2)
    assert torch.allclose(xy[:, 0].abs(), (s - s.mean()).abs(), atol=1e-4)  # the line's own coordinate
    assert xy[:, 1].var() < 1e-8 * xy[:, 0].var()
    # already on the principal axes (more spread along x), loadings positive: returned as they are
    points = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    assert torch.allclose(gap.pca_2d(points), points, atol=1e-6)
    assert torch.allclose(gap.pca_2d(-points), -points, atol=1e-6)  # same axes (signs fixed by them), points mirrored


def test_gap_picture_draws_both_modalities_in_their_colours():
    visual, text = torch.randn(30, 8) + 3, torch.randn(30, 8) - 3
    picture = gap.gap_picture(visual, text, "caption", size=200)
    assert picture.shape == (3, 224, 200) and picture.dtype == torch.uint8
    plot = picture[:, 25:-1, 1:-1].reshape(3, -1).T  # inside the frame, below the legend bar: (pixels, 3)
    for rgb in (gap.VISUAL_RGB, gap.TEXT_RGB):
        assert (plot == torch.tensor(rgb, dtype=torch.uint8)).all(1).sum() >= 25  # a 5x5 dot's worth at least


def test_modality_gap_command_writes_picture_and_numbers(checkpoint, capsys):
    results = evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", "--num_workers=0", "--split=val",
                             "--modality_gap"])
    assert list(results) == ["val"]
    m = results["val"]
    assert m["n"] == 9 and 0 <= m["centroid_gap"] <= 2 and 50 <= m["probe_acc"] <= 100
    assert -1 <= m["matched_cos"] <= 1 and -1 <= m["mismatched_cos"] <= 1
    saved = json.loads((checkpoint.parent / "gap_val_loc1.json").read_text())
    assert saved["measures"] == m and saved["split"] == "val" and saved["loc"] == "loc1"
    picture = read_image(str(checkpoint.parent / "gap_val_loc1.png"))
    assert picture.shape == (3, 504, 480)
    out = capsys.readouterr().out
    assert "centroid gap" in out and f"{m['probe_acc']:.2f}" in out and "gap_val_loc1.png" in out
    # the numbers are those of the features the model gives at loc1, measured by gap.py
    model = evaluate.load_model(str(checkpoint))
    ckpt = evaluate.read_checkpoint(str(checkpoint))
    world = data.make_dataset(evaluate.run_data_config(ckpt, evaluate.EvalConfig()), "val",
                              data.load_tokenizer(model.cfg.text_encoder), train=False, imsize=64, max_query_len=16,
                              world=ckpt["world_config"])
    visual, text = gap.collect_features(model, world, "loc1")
    assert visual.shape == text.shape == (9, 32)
    assert gap.gap_measures(visual, text) == pytest.approx(m)


def test_modality_gap_refuses_a_location_whose_widths_differ_before_writing(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--gap_loc loc3: this checkpoint's visual features there are 32 wide and its "
                                         "text features 64"):
        evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", "--modality_gap", "--gap_loc=loc3",
                       f"--out_dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []
