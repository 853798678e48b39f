"""The embedded default at CI size: toy CLIP teacher, distillation training, evaluation and pictures, offline.

Run: python -m pytest -q tests/test_toy.py
"""
import dataclasses
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


def test_a_toy_teacher_built_with_other_settings_is_refused_not_reused(tmp_path):
    vocab = tmp_path / "vocab"
    data.write_shapes_vocab(str(vocab))
    built = ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **TINY_TEACHER)
    (tmp_path / "clip").mkdir()  # stands for a finished build: its settings are in metrics.json
    (tmp_path / "clip" / "metrics.json").write_text(json.dumps({"config": dataclasses.asdict(built)}))
    toy.check_world_files(str(vocab), built)  # the same settings: reused
    with pytest.raises(ValueError, match=r"other settings: steps 30 \(this run: 400\); imsize 64 \(this run: 128\)"):
        toy.check_world_files(str(vocab), dataclasses.replace(built, steps=400, imsize=128))
    with pytest.raises(FileExistsError, match="clip exists"):  # before any training, not at the final move
        build_toy_teacher(built)
    (vocab / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nred\n")
    with pytest.raises(ValueError, match="lacks words the synthetic world says"):
        toy.check_world_files(str(vocab), None)


def test_a_killed_teacher_build_leaves_nothing_a_later_run_trusts(tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(toy, "retrieval_accuracy", killed)  # dies after the weights are written, before the move
    with pytest.raises(KeyboardInterrupt):
        build_toy_teacher(ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **{**TINY_TEACHER, "steps": 2}))
    assert not (tmp_path / "clip").exists() and (tmp_path / "clip.partial").exists()
    monkeypatch.undo()
    build_toy_teacher(ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **{**TINY_TEACHER, "steps": 2}))
    assert {p.name for p in (tmp_path / "clip").iterdir()} >= {"metrics.json", "config.json"}
    assert not (tmp_path / "clip.partial").exists()
