"""evaluate.py: metrics on hand-made boxes, the canvas -> original-pixel mapping, the CLI (table, JSON, pictures,
single-image prediction); gap.py's modality-gap measures on hand-made features, and evaluate.py --modality_gap.

Run: python -m pytest -q tests/test_evaluate.py
"""
import json
import math

import pytest
import torch
from torchvision.io import decode_png, read_file, read_image, write_png

import data
import evaluate
import gap
import train
from files import read_checkpoint
from flags import UsageError
from losses import paired_iou_xyxy


def test_iou_of_exactly_one_half_counts_as_correct():
    pred = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 4.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    gt = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 3.0, 1.0], [2.0, 2.0, 3.0, 3.0]])
    iou = paired_iou_xyxy(pred, gt)
    assert iou.tolist() == [0.5, 0.75, 0.0]  # exactly representable: the >= boundaries are really tested
    m = evaluate.summarise(evaluate.hit_counts(iou))
    assert m["n"] == 3 and m["acc@0.5"] == pytest.approx(200 / 3) and m["acc@0.75"] == pytest.approx(100 / 3)
    assert m["miou"] == pytest.approx(1.25 / 3)
    # counts add across ranks: two halves summed give the whole
    halves = evaluate.hit_counts(iou[:1]) + evaluate.hit_counts(iou[1:])
    assert evaluate.summarise(halves) == m


def test_canvas_boxes_map_back_to_original_pixels(tmp_path):
    data.write_shapes_vocab(str(tmp_path / "v"))
    tok = data.load_tokenizer(str(tmp_path / "v"))
    world = data.make_dataset(data.DataConfig("shapes", shapes_image_size=96), "val", tok, train=False, imsize=64,
                              max_query_len=16)
    batch = data.collate([world[i] for i in range(6)])
    back = evaluate.predicted_xyxy(batch["target"], 64, batch["scale"], batch["pad_offset"])
    assert torch.allclose(back, batch["gt_xyxy"], atol=1e-3)
    # a prediction covering the whole canvas is clamped to the canvas, i.e. to the image plus its padding
    whole = evaluate.predicted_xyxy(torch.tensor([[0.5, 0.5, 1.5, 1.5]] * 6), 64, batch["scale"], batch["pad_offset"])
    canvas = evaluate.predicted_xyxy(torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 6), 64, batch["scale"], batch["pad_offset"])
    assert torch.allclose(whole, canvas)
    h, w = batch["orig_size"].T.float()
    assert (canvas[:, 0] <= 0).all() and (canvas[:, 2] >= w - 1e-3).all() and (canvas[:, 3] >= h - 1e-3).all()


def test_a_dataset_with_slices_is_also_scored_per_slice(tmp_path, tiny_config):
    """The synthetic world's rare and frequent slices: each scored like the whole on its own samples, and together
    they are the whole."""
    data.write_shapes_vocab(str(tmp_path / "v"))
    tok = data.load_tokenizer(str(tmp_path / "v"))
    world = data.ShapesWorld("val", tok, train=False, imsize=64, max_query_len=8, size=24, image_size=64)
    from model import GroundingModel
    torch.manual_seed(0)
    model = GroundingModel(tiny_config(text_config={**data_bert(tok)}))
    metrics, records = evaluate.evaluate(model, world, batch_size=5, keep_records=True)
    rare = [world.slice_of(i) for i, _, _ in records]
    assert set(metrics["slices"]) == {"frequent", "rare"} and 0 < sum(rare) < 24
    for s, name in enumerate(world.slices):
        ious = torch.tensor([iou for (i, iou, _), r in zip(records, rare) if r == s])
        assert metrics["slices"][name] == evaluate.summarise(evaluate.hit_counts(ious))
    assert sum(m["n"] for m in metrics["slices"].values()) == metrics["n"] == 24
    assert sum(m["miou"] * m["n"] for m in metrics["slices"].values()) == pytest.approx(metrics["miou"] * 24)


def data_bert(tok):
    return {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 1,
            "intermediate_size": 32, "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_train_flags):
    out = tmp_path_factory.mktemp("run")
    train.main(tiny_train_flags(out, "--epochs=1", "--final_eval=false"))
    return out / "last.pt"


def test_cli_prints_every_split_and_writes_json(checkpoint, tmp_path, capsys):
    results = evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", "--num_workers=0",
                             f"--json={tmp_path / 'r.json'}"])
    assert set(results) == {"val", "test"} and all(r["n"] == 9 for r in results.values())
    out = capsys.readouterr().out
    assert "Acc@0.5" in out and "test" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["dataset"] == "shapes" and saved["results"]["val"]["acc@0.5"] == results["val"]["acc@0.5"]


def test_vis_writes_valid_pngs_of_the_worst_predictions(checkpoint, tmp_path):
    evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", "--num_workers=0", "--split=val", "--vis=3", "--worst",
                   f"--out_dir={tmp_path}"])
    pngs = sorted(tmp_path.glob("shapes_val_*.png"))
    assert len(pngs) == 3
    for p in pngs:
        img = decode_png(read_file(str(p)))
        assert img.shape[0] == 3 and img.shape[1] >= 40 and img.dtype == torch.uint8


def test_single_image_prediction(checkpoint, tmp_path):
    tok = data.load_tokenizer(read_checkpoint(str(checkpoint))["model_config"]["text_encoder"])
    world = data.make_dataset(data.DataConfig("shapes", shapes_image_size=64), "test", tok, train=False, imsize=64,
                              max_query_len=16)
    image = world.original_image(0)
    write_png(image, str(tmp_path / "photo.png"))
    out = evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", f"--image={tmp_path / 'photo.png'}",
                         "--text=the red circle on the left", f"--out_dir={tmp_path}"])
    x1, y1, x2, y2 = out["box_xyxy"]
    H, W = image.shape[1:]
    assert 0 <= x1 <= x2 <= W and 0 <= y1 <= y2 <= H
    picture = decode_png(read_file(out["picture"]))  # enlarged to a 480 long side, plus the caption bar
    assert picture.shape[0] == 3 and max(picture.shape[1:]) >= 480
    with pytest.raises(UsageError, match="--image .*nothing.png: no such file"):
        evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", f"--image={tmp_path / 'nothing.png'}", "--text=a"])


def test_missing_or_wrong_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(UsageError, match="--ckpt"):
        evaluate.main([])
    with pytest.raises(UsageError, match="--ckpt .*nope.pt: no such checkpoint file"):
        evaluate.main([f"--ckpt={tmp_path / 'nope.pt'}", "--device=cpu"])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="--ckpt .*other.pt: neither a checkpoint of train.py"):
        evaluate.main([f"--ckpt={tmp_path / 'other.pt'}", "--device=cpu"])
    (tmp_path / "hostname").write_text("build-machine-7\n")
    with pytest.raises(UsageError, match=r"^--ckpt .*hostname: not a PyTorch checkpoint \(torch.load cannot read "
                                         r"it\)$"):
        evaluate.main([f"--ckpt={tmp_path / 'hostname'}", "--device=cpu"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hostname", "other.pt"]  # no vis/ folder, nothing else


# -----------------------------------------------------------------------------
# refused up front, with the value named


@pytest.mark.parametrize("argv, message", [
    (["--text=the red circle"], "--text and --image together"),
    (["--image=photo.png"], "--text and --image together"),
    (["--image=photo.png", "--text=  "], "an expression with a word in it"),
    (["--image=photo.png", "--text=\U0001f600 \u200b!!"], "an expression with a word in it"),  # emoji, control, punctuation
    (["--json=/nonexistent/dir/x.json"], "a file in an existing folder you can write to, got '/nonexistent"),
    (["--dataset=refcocoo"], "--dataset: expected one of refcoco"),
    (["--device=foo"], "--device: expected auto, cpu, cuda or mps, got 'foo'"),  # not torch's RuntimeError
    (["--modality_gap", "--gap_loc=loc5"], "--gap_loc: expected loc1, loc2, loc3 or loc4, got 'loc5'"),
    (["--modality_gap", "--vis=2"], "--modality_gap: expected no --image or --vis with it"),
    (["--modality_gap", "--image=photo.png", "--text=a cat"], "--modality_gap: expected no --image or --vis"),
])
def test_bad_arguments_are_refused_before_anything_is_loaded(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt=never_read.pt", *argv])  # the checkpoint is not even opened
    assert message in capsys.readouterr().err


def test_a_tokenizer_too_big_for_the_checkpoints_text_encoder_is_refused(checkpoint, tmp_path):
    data.write_vocab(str(tmp_path / "big"), [f"w{i}" for i in range(200)])
    with pytest.raises(UsageError, match=r"205 tokens but the checkpoint's text encoder embeds \d+"):
        evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", f"--tokenizer={tmp_path / 'big'}"])


def test_an_expression_the_tokenizer_does_not_know_is_refused(checkpoint, tmp_path):
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    write_png(image, str(tmp_path / "photo.png"))
    with pytest.raises(ValueError, match="knows none of its words"):
        evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", f"--image={tmp_path / 'photo.png'}",
                       "--text=zebra umbrella", f"--out_dir={tmp_path}"])


def test_drop_invalid_skips_bad_entries_and_the_table_counts_them(checkpoint, tmp_path, capsys):
    from test_data import FORMATS, fabricate, make_split

    fabricate(tmp_path, "refcoco", n=2)
    entries = torch.load(tmp_path / "splits" / "unc" / "unc_val.pth", weights_only=True)
    make_split(tmp_path, "refcoco", "val", entries + [FORMATS["refcoco"][0]("im0.jpg", [1, 1, 0, 5], "zero width")])
    flags = [f"--ckpt={checkpoint}", "--device=cpu", "--num_workers=0", "--dataset=refcoco", "--split=val",
             f"--split_root={tmp_path / 'splits'}", f"--data_root={tmp_path / 'images'}"]
    with pytest.raises(ValueError, match=r"(?s)1 invalid entries \(--drop_invalid skips them\).*entry 2: zero-area box"):
        evaluate.main(flags)
    with pytest.warns(UserWarning, match=r"refcoco val: skipped 1 invalid entries; .*entry 2: zero-area box"):
        results = evaluate.main(flags + ["--drop_invalid"])
    assert results["val"]["n"] == 2 and results["val"]["skipped"] == 1
    assert "(1 invalid entries skipped, not counted)" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# the modality gap (gap.py) on hand-made features, and evaluate.py --modality_gap


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
    dcfg = evaluate.run_data_config(evaluate.read_checkpoint(str(checkpoint)), evaluate.EvalConfig())
    world = data.make_dataset(dcfg, "val", data.load_tokenizer(model.cfg.text_encoder), train=False,
                              imsize=64, max_query_len=16)
    visual, text = evaluate.collect_features(model, world, "loc1")
    assert visual.shape == text.shape == (9, 32)
    assert gap.gap_measures(visual, text) == pytest.approx(m)


def test_modality_gap_refuses_a_location_whose_widths_differ_before_writing(checkpoint, tmp_path):
    with pytest.raises(UsageError, match="--gap_loc loc3: this checkpoint's visual features there are 32 wide and its "
                                         "text features 64"):
        evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", "--modality_gap", "--gap_loc=loc3",
                       f"--out_dir={tmp_path}"])
    assert list(tmp_path.iterdir()) == []
