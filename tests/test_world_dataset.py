"""world/dataset.py: the synthetic world's scenes as a grounding dataset: deterministic, tight boxes, the rare-word
slices, the unaugmented-sample cache, the vocabulary, and a DataLoader.

Run: python -m pytest -q tests/test_world_dataset.py
"""
import warnings

import pytest
import torch

import data
from world import scenes
from world.dataset import ShapesWorld, _unaugmented
from world.recipe import WorldConfig

S = 96  # canvas side for these tests


def test_its_slices_are_the_expressions_that_say_a_rare_word(shapes_tok):
    world = ShapesWorld("val", shapes_tok, train=False, imsize=S, max_query_len=20, size=40)
    assert [world.slice_of(i) for i in range(40)] == [int(scenes.says_rare(world.scene(i)["text"])) for i in range(40)]
    assert world.slices[1] == "rare" and 0 < sum(world.slice_of(i) for i in range(40)) < 40


def test_scenes_are_deterministic_with_tight_boxes_inside(shapes_tok):
    small = WorldConfig(shapes_train_size=30, shapes_eval_size=30)
    a, b, train = (data.make_dataset(data.DataConfig(), split, shapes_tok, train=False, imsize=S, world=small)
                   for split in ("val", "val", "train"))
    other_seed = ShapesWorld("val", shapes_tok, train=False, imsize=S, max_query_len=20, seed=1, size=30)
    assert len(a) == 30 and len(data.make_dataset(data.DataConfig(), "train", shapes_tok, train=True)) == 20000
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


def test_the_captions_scenes_read_once_by_the_toy_clip_are_drawn_alike_but_not_cached(shapes_tok):
    world = ShapesWorld("captions", shapes_tok, train=False, imsize=S, max_query_len=16, image_size=64)
    cached = _unaugmented.cache_info().currsize
    sample, drawn = world[7], _unaugmented.__wrapped__(0, "captions", 7, 64, S, world.rare_keep)
    assert _unaugmented.cache_info().currsize == cached
    assert all(torch.equal(sample[k], v) if torch.is_tensor(v) else sample[k] == v for k, v in drawn.items())


def test_its_vocabulary_is_bert_shaped(world_vocab):
    path = f"{world_vocab}/vocab.txt"
    lines = open(path).read().split("\n")
    assert lines[0] == "[PAD]" and {"[CLS]", "[SEP]", "[UNK]", "[MASK]", "leftmost", "above"} <= set(lines)
    tok = data.load_tokenizer(world_vocab)
    assert tok.pad_token_id == 0 and tok.tokenize("the leftmost small red circle") == [
        "the", "leftmost", "small", "red", "circle"]


def test_scenes_in_a_dataloader(shapes_tok):
    ds = data.make_dataset(data.DataConfig(), "train", shapes_tok, train=True, imsize=S,
                           world=WorldConfig(shapes_train_size=8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a collate that falls back to slow paths
        batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.collate)))
    assert batch["image"].shape == (4, 3, S, S) and len(batch["text"]) == 4
    assert batch["index"].tolist() == [0, 1, 2, 3]
    back = data.canvas_to_original_xyxy(batch["target"], S, batch["scale"], batch["pad_offset"])
    assert torch.allclose(back, batch["gt_xyxy"], atol=1e-3)
