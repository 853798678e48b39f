"""world/toy_clip.py: the synthetic world's toy CLIP teacher, built at CI size, offline; the random CLIP and word
tokenizer it starts from (which tests and benchmarks build too).

Run: python -m pytest -q tests/test_world_toy_clip.py
"""
import json

import pytest
from transformers import CLIPTokenizer

from clip_teacher import CLIPTeacher
from machinery.flags import UsageError
from world import toy_clip
from world.dataset import ShapesWorld
from world.toy_clip import ToyCLIPConfig, build_toy_teacher, save_word_tokenizer

TINY_TEACHER = {"steps": 30, "batch_size": 16, "width": 32, "layers": 1, "image_size": 32, "embed_dim": 64,
                "imsize": 64, "shapes_image_size": 64, "eval_size": 32}

def test_toy_teacher_learns_and_loads_as_a_teacher(tmp_path):
    metrics = build_toy_teacher(ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **TINY_TEACHER))
    assert metrics["last_loss"] < metrics["first_loss"]  # the contrastive loss went down
    # no model retrieves better than the oracle that knows which expressions fit which scene (the ceiling), and the
    # oracle beats chance, since most of a batch's expressions fit one scene only
    assert metrics["val_image_to_text_top1"] <= metrics["ceiling_top1"]
    assert 100 / metrics["config"]["batch_size"] < metrics["ceiling_top1"] <= 100
    assert json.loads((tmp_path / "clip" / "metrics.json").read_text())["config"]["steps"] == 30
    teacher = CLIPTeacher(str(tmp_path / "clip"), device="cpu")
    emb = teacher.encode_text(["the red circle", "the big blue square on the left"])
    assert emb.shape == (2, 64) and not teacher.trainable


def test_the_retrieval_ceiling_counts_expressions_that_fit_several_scenes(shapes_tok):
    world = ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, size=64)
    assert toy_clip.retrieval_ceiling(world, 1) == 100  # alone, its own expression is the only candidate
    in_64 = toy_clip.retrieval_ceiling(world, 64)
    assert 100 / 64 < in_64 < 50  # "the red circle" fits many scenes of 64: 10.7 % on the 512 val scenes


def test_an_existing_teacher_folder_is_refused_before_any_training(tmp_path):
    (tmp_path / "clip").mkdir()
    with pytest.raises(UsageError, match="clip exists"):  # before any training, not at the final move
        build_toy_teacher(ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **TINY_TEACHER))


def test_a_killed_teacher_build_leaves_nothing_a_later_run_trusts(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(toy_clip, "retrieval_accuracy", killed)  # dies after the weights are written, before the move
    with pytest.raises(KeyboardInterrupt):
        build_toy_teacher(ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **{**TINY_TEACHER, "steps": 2}))
    assert not (tmp_path / "clip").exists() and (tmp_path / "clip.partial").exists()
    monkeypatch.undo()
    build_toy_teacher(ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **{**TINY_TEACHER, "steps": 2}))
    assert {p.name for p in (tmp_path / "clip").iterdir()} >= {"metrics.json", "config.json"}
    assert not (tmp_path / "clip.partial").exists()


def test_word_tokenizer_spells_given_words_as_single_tokens(tmp_path):
    tok = save_word_tokenizer(tmp_path, ["circle", "red", "left"])
    assert tok.tokenize("the red circle on the left") == ["t", "h", "e</w>", "red</w>", "circle</w>", "o", "n</w>",
                                                          "t", "h", "e</w>", "left</w>"]
    assert tok.eos_token_id == len(tok) - 1  # specials last, as in OpenAI's vocabulary
    assert CLIPTokenizer.from_pretrained(tmp_path).tokenize("circles") == ["circl", "e", "s</w>"]
