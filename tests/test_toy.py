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
import runtime
import toy
import train
import transforms
from clip_teacher import CLIPTeacher
from model import GroundingModel
from runtime import UsageError
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
def test_default_path_builds_teacher_and_detr_distils_evaluates_and_draws(tmp_path, tiny_train_flags, monkeypatch):
    # train.py builds the missing toy teacher with ToyCLIPConfig's defaults; shrink them to CI size
    monkeypatch.setattr(toy, "ToyCLIPConfig",
                        lambda **kw: ToyCLIPConfig(**{**kw, **{k: v for k, v in TINY_TEACHER.items() if k != "steps"}}))
    # toy models are built only at the preset's own paths (relative: under tmp_path here), never at a typed one
    monkeypatch.chdir(tmp_path)
    teacher, detr = toy.PRESET["teacher"], toy.PRESET["visual_init"]  # and the preset's frozen, cached branch
    out = train.main(tiny_train_flags(tmp_path / "run", "--distill=cos", f"--teacher={teacher}",
                                      "--toy_teacher_steps=20", "--epochs=2", f"--visual_init={detr}",
                                      "--toy_detr_steps=3", "--cache_visual=true", "--augment=false"))
    teacher, detr = tmp_path / teacher, tmp_path / detr
    assert (teacher / "metrics.json").exists() and out["step"] == 6 and out["test_n"] == 9
    assert torch.load(detr, weights_only=True)["toy_config"]["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_distill_img"] > 0 and log[0]["train_distill_txt"] > 0
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["teacher"]["name"] == toy.PRESET["teacher"]  # as given: relative to where the run started
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
    with pytest.raises(UsageError, match="clip exists"):  # before any training, not at the final move
        build_toy_teacher(built)
    (vocab / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nred\n")
    with pytest.raises(ValueError, match="lacks words the synthetic world says"):
        toy.check_world_files(str(vocab), None)


def test_toy_models_are_built_at_the_presets_paths_only_never_at_a_typed_one(tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    env = runtime.DeviceEnv(torch.device("cpu"), False, 0, 0, 1)
    mcfg = tiny_config(text_encoder=str(tmp_path / "typo" / "vocab"), visual_init=str(tmp_path / "typo" / "detr.pth"))
    with pytest.raises(UsageError) as info:
        toy.prepare_world(mcfg, data.DataConfig(), str(tmp_path / "typo" / "clip"), 30, 30, env)
    assert [line.split(":")[0] for line in str(info.value).splitlines()] == [
        f"--text_encoder {tmp_path}/typo/vocab", f"--teacher {tmp_path}/typo/clip",
        f"--visual_init {tmp_path}/typo/detr.pth"]
    assert f"python toy.py --out_dir {tmp_path}/typo/clip --steps 30 --imsize 64" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing built, not even the folder
    # the preset's own path: written on first use (distillation off, no DETR: only the vocabulary)
    toy.prepare_world(tiny_config(text_encoder=toy.PRESET["text_encoder"]), data.DataConfig(), None, 30, 30, env)
    assert (tmp_path / toy.PRESET["text_encoder"] / "vocab.txt").exists()


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


# -----------------------------------------------------------------------------
# the toy DETR and the frozen branch's cache

TINY_DETR = {"steps": 40, "batch_size": 32, "lr": 2e-3, "train_size": 1280, "shapes_image_size": 64}


def test_cell_targets_put_each_object_at_the_cell_of_its_centre(shapes_tok):
    world = data.ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, image_size=128)
    for i in range(20):
        scene, sample = world.scene(i), world[i]
        t = toy.cell_targets(sample, scene, stride=16)
        assert t["objectness"].shape == (16,) and t["labels"].shape == (16, 3) and t["box"].shape == (16, 4)
        biggest = max(scene["objects"], key=lambda o: o["side"])  # never hidden behind a smaller one
        names = [tuple(names[k] for (_, names), k in zip(toy.ATTRIBUTES, row))
                 for row in t["labels"][t["objectness"] > 0].tolist()]
        assert (biggest["size"], biggest["colour"], biggest["shape"]) in names
        assert 1 <= len(names) <= len(scene["objects"]) and (t["labels"][t["objectness"] == 0] == -100).all()
        # the target's box, mapped to the canvas, is where the cell of its centre says
        cx, cy = (sample["target"][:2] * 64).tolist()
        cell = int(cy // 16) * 4 + int(cx // 16)
        assert t["objectness"][cell] == 1


def test_toy_detr_learns_and_loads_through_visual_init(tmp_path, shapes_tok, tiny_config):
    mcfg = tiny_config(resnet_stages=3, trainable_bn=True, enc_layers=1, max_query_len=16)
    cfg = toy.ToyDETRConfig(path=str(tmp_path / "detr.pth"), model={k: getattr(mcfg, k) for k in toy.VISUAL_FIELDS},
                            **TINY_DETR)
    metrics = toy.build_toy_detr(cfg, mcfg, shapes_tok)
    assert metrics["val_colour"] > 40  # 5 colours: chance is 20 %; measured 70-80 % after these 40 steps
    ckpt = torch.load(tmp_path / "detr.pth", weights_only=True)
    assert ckpt["toy_config"]["steps"] == 40 and any(k.startswith("backbone.0.body.layer3") for k in ckpt["model"])
    assert not any("layer4" in k for k in ckpt["model"])
    model = GroundingModel(dataclasses.replace(mcfg, visual_init=str(tmp_path / "detr.pth")))
    assert torch.equal(model.backbone.layer3[0].conv1.weight, ckpt["model"]["backbone.0.body.layer3.0.conv1.weight"])
    toy.check_world_files(str(tmp_path), None, cfg)  # the same settings: reused
    with pytest.raises(ValueError, match=r"toy DETR .* other settings: steps 40 \(this run: 300\)"):
        toy.check_world_files(str(tmp_path), None, dataclasses.replace(cfg, steps=300))
    with pytest.raises(UsageError, match="detr.pth exists"):
        toy.build_toy_detr(cfg, mcfg, shapes_tok)


def test_a_killed_detr_build_leaves_nothing_a_later_run_trusts(tmp_path, shapes_tok, tiny_config, monkeypatch):
    mcfg = tiny_config(resnet_stages=3, trainable_bn=True, enc_layers=1, max_query_len=16)
    cfg = toy.ToyDETRConfig(path=str(tmp_path / "detr.pth"), model={k: getattr(mcfg, k) for k in toy.VISUAL_FIELDS},
                            **{**TINY_DETR, "steps": 2})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(toy.os, "replace", killed)  # dies after the weights are written, before the move
    with pytest.raises(KeyboardInterrupt):
        toy.build_toy_detr(cfg, mcfg, shapes_tok)
    assert not (tmp_path / "detr.pth").exists() and (tmp_path / "detr.pth.partial").exists()
    monkeypatch.undo()
    toy.build_toy_detr(cfg, mcfg, shapes_tok)  # the leftover is overwritten, the build is whole
    assert (tmp_path / "detr.pth").exists() and not (tmp_path / "detr.pth.partial").exists()


def test_the_cache_holds_what_the_frozen_branch_and_teacher_would_compute(shapes_tok, tiny_config, tiny_clip_dir):
    mcfg = tiny_config(resnet_stages=3, max_query_len=16)
    model, teacher = GroundingModel(mcfg).train(), CLIPTeacher(tiny_clip_dir, device="cpu")
    world = data.ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, size=10, image_size=64)
    cache = toy.CachedVisual(world, model, teacher, (32, 32), torch.device("cpu"), batch_size=4)
    assert model.training and len(cache) == 10  # left in the mode it was in
    batch = data.collate([world[i] for i in range(10)])
    cached = data.collate([cache[i] for i in range(10)])
    model.eval()
    with torch.no_grad():
        vis, vis_is_pad, cnn = model.encode_image(batch["image"], batch["img_is_pad"])
        image, text = teacher.targets(transforms.unnormalise(batch["image"]), batch["text"], (32, 32))
        direct = model(batch["image"], batch["img_is_pad"], batch["input_ids"], batch["attention_mask"])
        via_cache = model(None, None, cached["input_ids"], cached["attention_mask"],
                          (cached["vis"], cached["vis_is_pad"], cached["cnn"]))
    torch.testing.assert_close(cached["vis"], vis)
    assert torch.equal(cached["vis_is_pad"], vis_is_pad) and cached["text"] == batch["text"]
    torch.testing.assert_close(cached["teacher_image"], image)
    torch.testing.assert_close(cached["teacher_text"], text)
    torch.testing.assert_close(via_cache["pred_boxes"], direct["pred_boxes"])
    for loc in ("loc1", "loc4"):
        torch.testing.assert_close(via_cache["distill"][loc], direct["distill"][loc])
