"""The embedded default at CI size: toy CLIP teacher, distillation training, evaluation and pictures, offline.

Run: python -m pytest -q tests/test_toy.py
"""
import json
import os

import pytest
import torch

import data
import evaluate
import toy
import train
from clip_teacher import CLIPTeacher
from toy import ToyCLIPConfig, build_toy_teacher

TINY_TEACHER = {"steps": 30, "batch_size": 16, "width": 32, "layers": 1, "image_size": 32, "embed_dim": 64,
                "imsize": 64, "shapes_image_size": 64, "eval_size": 32}


def test_hub_access_is_off_in_tests():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the default path must not need the network


def test_toy_teacher_learns_and_loads_as_a_teacher(tmp_path):
    metrics = build_toy_teacher(ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **TINY_TEACHER))
    assert metrics["last_loss"] < metrics["first_loss"]  # the contrastive loss went down
    assert 0 <= metrics["val_image_to_text_top1"] <= 100
    assert 100 / metrics["config"]["batch_size"] < metrics["ceiling_top1"] <= 100
    assert json.loads((tmp_path / "clip" / "metrics.json").read_text())["config"]["steps"] == 30
    teacher = CLIPTeacher(str(tmp_path / "clip"), device="cpu")
    emb = teacher.encode_text(["the red circle", "the big blue square on the left"])
    assert emb.shape == (2, 64) and not teacher.trainable


@pytest.mark.slow
def test_default_path_builds_the_teacher_distils_evaluates_and_draws(tmp_path, tiny_train_flags, monkeypatch):
    # train.py builds the missing toy teacher with ToyCLIPConfig's defaults; shrink them to CI size
    monkeypatch.setattr(toy, "ToyCLIPConfig",
                        lambda **kw: ToyCLIPConfig(**{**kw, **{k: v for k, v in TINY_TEACHER.items() if k != "steps"}}))
    teacher = tmp_path / "toy_clip"
    out = train.main(tiny_train_flags(tmp_path / "run", "--distill=cos", f"--teacher={teacher}",
                                      "--toy_teacher_steps=20", "--epochs=2"))
    assert (teacher / "metrics.json").exists() and out["step"] == 6 and out["test_n"] == 9
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_distill_img"] > 0 and log[0]["train_distill_txt"] > 0
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["teacher"]["name"] == str(teacher)
    results = evaluate.main([f"--ckpt={tmp_path / 'run' / 'best.pt'}", "--device=cpu", "--num_workers=0", "--vis=2",
                             f"--out_dir={tmp_path / 'vis'}"])
    assert set(results) == {"val", "test"} and len(list((tmp_path / "vis").glob("*.png"))) == 4


def test_the_retrieval_ceiling_counts_expressions_that_fit_several_scenes(shapes_tok):
    world = data.make_dataset(data.DataConfig(shapes_eval_size=64), "val", shapes_tok, train=False, imsize=64,
                              max_query_len=16)
    assert toy.retrieval_ceiling(world, 1) == 100  # alone, its own expression is the only candidate
    in_64 = toy.retrieval_ceiling(world, 64)
    assert 100 / 64 < in_64 < 50  # "the red circle" fits many scenes of 64: 10.7 % on the 512 val scenes
