"""world/prepare.py: before a run on the synthetic world, its toy models are built at the recipes' paths only,
checked against the run's settings, and the whole default path (toy CLIP, toy DETR, distillation, evaluation) runs
offline, as does a QRNet student's start from its toy Swin.

Run: python -m pytest -q tests/test_world_prepare.py
"""
import dataclasses
import hashlib
import json
import os

import pytest
import torch
from conftest import ROOT, TINY_SWIN
from test_world_toy_clip import TINY_TEACHER

import evaluate
import train
from machinery import runtime
from machinery.flags import UsageError
from world import prepare as world
from world.recipe import SHAPES, SHAPES_QRNET, WorldConfig
from world.toy_clip import ToyCLIPConfig


@pytest.mark.slow
def test_default_path_builds_teacher_and_detr_distils_evaluates_and_draws(tmp_path, tiny_train_flags, monkeypatch):
    # train.py builds the missing toy teacher with ToyCLIPConfig's defaults; shrink them to CI size
    monkeypatch.setattr(world, "ToyCLIPConfig",
                        lambda **kw: ToyCLIPConfig(**{**kw, **{k: v for k, v in TINY_TEACHER.items() if k != "steps"}}))
    # toy models are built only at the preset's own paths (relative: under tmp_path here), never at a typed one
    monkeypatch.chdir(tmp_path)
    teacher, detr = SHAPES["teacher"], SHAPES["visual_init"]  # and the preset's frozen, cached branch
    out = train.main(tiny_train_flags(tmp_path / "run", "--distill=cos", f"--teacher={teacher}",
                                      "--toy_teacher_steps=20", "--epochs=2", f"--visual_init={detr}",
                                      "--toy_detector_steps=3", "--cache_visual=true", "--augment=false"))
    teacher, detr = tmp_path / teacher, tmp_path / detr
    assert (teacher / "metrics.json").exists() and out["step"] == 6 and out["test_n"] == 9
    assert torch.load(detr, weights_only=True)["toy_config"]["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[0]["train_distill_img"] > 0 and log[0]["train_distill_txt"] > 0
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["teacher"]["name"] == SHAPES["teacher"]  # as given: relative to where the run started
    results = evaluate.main([f"--ckpt={tmp_path / 'run' / 'best.pt'}", "--device=cpu", "--num_workers=0", "--vis=2",
                             f"--out_dir={tmp_path / 'vis'}"])
    assert set(results) == {"val", "test"} and len(list((tmp_path / "vis").glob("*.png"))) == 4


def test_a_toy_teacher_built_with_other_settings_is_refused_not_reused(tmp_path, world_vocab):
    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text(open(f"{world_vocab}/vocab.txt").read())
    built = ToyCLIPConfig(out_dir=str(tmp_path / "clip"), **TINY_TEACHER)
    (tmp_path / "clip").mkdir()  # stands for a finished build: its settings are in metrics.json
    (tmp_path / "clip" / "metrics.json").write_text(json.dumps({"config": dataclasses.asdict(built)}))
    world.check_world_files(str(vocab), built)  # the same settings: reused
    with pytest.raises(ValueError, match=r"other settings: steps 30 \(this run: 400\); imsize 64 \(this run: 128\)"):
        world.check_world_files(str(vocab), dataclasses.replace(built, steps=400, imsize=128))
    (vocab / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nred\n")
    with pytest.raises(ValueError, match="lacks words the synthetic world says"):
        world.check_world_files(str(vocab), None)


def test_toy_models_are_built_at_the_presets_paths_only_never_at_a_typed_one(tmp_path, monkeypatch, tiny_config):
    monkeypatch.chdir(tmp_path)
    typo = tmp_path / "typo"
    with pytest.raises(UsageError) as info:  # said before anything is built or written, all three at once
        train.main(["--device=cpu", f"--text_encoder={typo}/vocab", f"--teacher={typo}/clip",
                    f"--visual_init={typo}/detr.pth", "--toy_teacher_steps=30"])
    assert [line.split(":")[0] for line in str(info.value).splitlines()[1:4]] == [
        f"  - --text_encoder {typo}/vocab", f"  - --teacher {typo}/clip", f"  - --visual_init {typo}/detr.pth"]
    assert f"python world/toy_clip.py --out_dir {typo}/clip --steps 30 --imsize 64" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing built, not even the folder
    env = runtime.DeviceEnv(torch.device("cpu"), False, 0, 0, 1)
    world.prepare(tiny_config(text_encoder=f"{typo}/vocab"), WorldConfig(), None, env)  # never builds at a typed path
    assert list(tmp_path.iterdir()) == []
    # the recipe's own path: written on first use (distillation off, no DETR: only the vocabulary)
    world.prepare(tiny_config(text_encoder=SHAPES["text_encoder"]), WorldConfig(), None, env)
    assert (tmp_path / SHAPES["text_encoder"] / "vocab.txt").exists()


def test_a_qrnet_run_builds_the_toy_swin_starts_from_it_and_refuses_other_settings(tmp_path, tiny_train_flags,
                                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # toy models are built at the preset's own (relative) paths only
    swin = SHAPES_QRNET["visual_init"]

    def flags(run: str, steps: int, *extra: str) -> list[str]:  # lr_visual 0: the Swin stays as the file has it
        return tiny_train_flags(tmp_path / run, "--backbone=swin_toy_qrnet", f"--swin={json.dumps(TINY_SWIN)}",
                                "--epochs=1", f"--visual_init={swin}", f"--toy_detector_steps={steps}", "--lr_visual=0",
                                *extra)
    assert train.main(flags("run", 3, "--dry_run")) == {}
    assert f"the synthetic world's toy Swin will be built at {swin}" in capsys.readouterr().out
    out = train.main(flags("run", 3))
    sd = torch.load(swin, weights_only=True)["state_dict"]
    assert out["step"] == 3 and f"visual branch: loaded {len(sd)} tensors from {swin}" in capsys.readouterr().out
    student = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    assert torch.equal(student["visual.stages.1.0.mlp.0.weight"], sd["backbone.layers.1.blocks.0.mlp.fc1.weight"])
    assert torch.equal(student["visual.neck.lateral.3.weight"], sd["neck.lateral_convs.3.conv.weight"])
    with pytest.raises(UsageError, match=rf"the toy Swin {swin} was built with other settings: steps 3 \(this run: 4\)"):
        train.main(flags("run2", 4))
    assert not (tmp_path / "run2").exists()  # refused before anything was written


def test_a_resumed_run_neither_builds_nor_checks_the_toy_detr_it_never_loads(tmp_path, tiny_train_flags, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the preset's own (relative) path, where a missing toy DETR would be built
    detr = SHAPES["visual_init"]
    train.main(tiny_train_flags(tmp_path / "run", f"--visual_init={detr}", "--toy_detector_steps=2", "--max_steps=1",
                                "--final_eval=false"))
    last = str(tmp_path / "run" / "last.pt")
    built = torch.load(detr, weights_only=True)
    torch.save({**built, "toy_config": {**built["toy_config"], "steps": 99}}, detr)  # as if made with other settings
    assert train.main([f"--resume={last}", "--max_steps=2", "--final_eval=false", "--device=cpu"])["step"] == 2
    os.remove(detr)
    monkeypatch.setattr(world, "build_toy_detr", lambda *args: pytest.fail("built a toy DETR the run never loads"))
    assert train.main([f"--resume={last}", "--max_steps=3", "--final_eval=false", "--device=cpu"])["step"] == 3
    assert not os.path.exists(detr)


def test_the_shipped_toy_models_are_the_recipes_and_unchanged(monkeypatch):
    """Every machine trains against the same toy CLIP and detectors, as every user downloads the same CLIP and DETR: they
    ship in world/toy_models (a build's floats depend on the machine and thread count). A rebuild that gives other
    bytes, or a file changed by hand, fails here; the recipe's settings are those they were built with."""
    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the project's root, where the scripts run
    folder = os.path.join("world", "toy_models")
    with open(os.path.join(folder, "SHA256SUMS")) as f:
        sums = dict(reversed(line.split()) for line in f if line.strip())
    for name, digest in sums.items():
        with open(os.path.join(folder, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, f"world/toy_models/{name} is not the shipped one"
    assert {SHAPES["teacher"], SHAPES["visual_init"], SHAPES_QRNET["visual_init"]} == {
        "world/toy_models/clip", "world/toy_models/detr.pth", "world/toy_models/swin.pth"}
    for backbone in ("resnet18", "swin_toy_qrnet"):
        cfg, _, mcfg, wcfg = train.read_flags([f"--backbone={backbone}"])
        world.check_world_files(mcfg.text_encoder, *world.toy_configs(mcfg, wcfg, cfg.teacher))  # used, not rebuilt
        assert all(os.path.exists(p) for p in (mcfg.text_encoder, cfg.teacher, mcfg.visual_init))
