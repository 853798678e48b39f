"""evaluate.py: metrics on hand-made boxes, the canvas -> original-pixel mapping, the CLI (table, JSON, pictures,
single-image prediction), refusals before anything is loaded (--modality_gap: tests/test_tools_gap.py).

Run: python -m pytest -q tests/test_evaluate.py
"""
import json

import pytest
import torch
from torchvision.io import decode_png, read_file, write_png

import data
import evaluate
from losses import paired_iou_xyxy
from machinery.checkpoints import read_checkpoint
from machinery.flags import UsageError
from model import GroundingModel
from world.dataset import ShapesWorld, write_vocab
from world.recipe import WorldConfig


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


def test_canvas_boxes_map_back_to_original_pixels(shapes_tok):
    world = ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, image_size=96)
    batch = data.collate([world[i] for i in range(6)])
    back = evaluate.predicted_xyxy(batch["target"], 64, batch["scale"], batch["pad_offset"])
    assert torch.allclose(back, batch["gt_xyxy"], atol=1e-3)
    # a prediction covering the whole canvas is clamped to the canvas, i.e. to the image plus its padding
    whole = evaluate.predicted_xyxy(torch.tensor([[0.5, 0.5, 1.5, 1.5]] * 6), 64, batch["scale"], batch["pad_offset"])
    canvas = evaluate.predicted_xyxy(torch.tensor([[0.5, 0.5, 1.0, 1.0]] * 6), 64, batch["scale"], batch["pad_offset"])
    assert torch.allclose(whole, canvas)
    h, w = batch["orig_size"].T.float()
    assert (canvas[:, 0] <= 0).all() and (canvas[:, 2] >= w - 1e-3).all() and (canvas[:, 3] >= h - 1e-3).all()


def test_a_dataset_with_slices_is_also_scored_per_slice(shapes_tok, tiny_config):
    """The synthetic world's rare and frequent slices: each scored like the whole on its own samples, and together
    they are the whole."""
    world = ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=8, size=24, image_size=64)
    torch.manual_seed(0)
    model = GroundingModel(tiny_config(text_config={**data_bert(shapes_tok)}))
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


def test_cli_prints_every_split_and_writes_json(checkpoint, tmp_path, capsys):
    results = evaluate.main([f"--ckpt={checkpoint}", "--device=cpu", "--num_workers=0",
                             f"--json={tmp_path / 'r.json'}"])
    assert set(results) == {"val", "test"} and all(r["n"] == 9 for r in results.values())
    out = capsys.readouterr().out
    assert "Acc@0.5" in out and "test" in out
    assert f"shapes, {checkpoint}: the weights of step 3 (epoch 1), the run's latest" in out  # which weights are scored
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
    world = data.make_dataset(data.DataConfig(), "test", tok, train=False, imsize=64, max_query_len=16,
                              world=WorldConfig(shapes_image_size=64))
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
    (["--modality_gap", "--gap_loc=loc5"], "--gap_loc: expected one of loc1, loc2, loc3, loc4, got 'loc5'"),
    (["--modality_gap", "--vis=2"], "--modality_gap: expected no --image or --vis with it"),
    (["--modality_gap", "--image=photo.png", "--text=a cat"], "--modality_gap: expected no --image or --vis"),
])
def test_bad_arguments_are_refused_before_anything_is_loaded(argv, message, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--ckpt=never_read.pt", *argv])  # the checkpoint is not even opened
    assert message in capsys.readouterr().err


def test_a_tokenizer_too_big_for_the_checkpoints_text_encoder_is_refused(checkpoint, tmp_path):
    write_vocab(str(tmp_path / "big"), [f"w{i}" for i in range(200)])
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
