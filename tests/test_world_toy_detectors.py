"""world/toy_detectors.py: the toy DETR and the toy Swin, built at CI size, offline, loaded through --visual_init, and
refused when built with other settings than a run asks for.

Run: python -m pytest -q tests/test_world_toy_detectors.py
"""
import dataclasses

import pytest
import torch
from conftest import TINY_SWIN

from machinery.flags import UsageError
from machinery.interop import load_visual_checkpoint
from model import GroundingModel
from world import prepare
from world import toy_detectors as toy
from world.dataset import ShapesWorld

# -----------------------------------------------------------------------------
# the toy DETR

TINY_DETR = {"steps": 40, "batch_size": 32, "lr": 2e-3, "train_size": 1280, "shapes_image_size": 64}


def test_cell_targets_put_each_object_at_the_cell_of_its_centre(shapes_tok):
    world = ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, image_size=128)
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
    model = GroundingModel(mcfg)
    load_visual_checkpoint(model, str(tmp_path / "detr.pth"))
    assert torch.equal(model.visual.backbone.layer3[0].conv1.weight,
                       ckpt["model"]["backbone.0.body.layer3.0.conv1.weight"])
    prepare.check_world_files(str(tmp_path), None, cfg)  # the same settings: reused
    with pytest.raises(ValueError, match=r"toy DETR .* other settings: steps 40 \(this run: 300\)"):
        prepare.check_world_files(str(tmp_path), None, dataclasses.replace(cfg, steps=300))
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
    assert list(tmp_path.iterdir()) == []  # neither a detector nor a temp file
    monkeypatch.undo()
    toy.build_toy_detr(cfg, mcfg, shapes_tok)  # the build is whole
    assert [p.name for p in tmp_path.iterdir()] == ["detr.pth"]


# -----------------------------------------------------------------------------
# the toy Mask R-CNN Swin of the QRNet student

TINY_SWIN_BUILD = {"steps": 20, "batch_size": 16, "lr": 2e-3, "train_size": 640, "shapes_image_size": 64}


def test_toy_swin_learns_and_loads_through_visual_init_in_mmdets_layout(tmp_path, shapes_tok, tiny_config, capsys):
    mcfg = tiny_config(backbone="swin_toy_qrnet", swin=dict(TINY_SWIN), max_query_len=16)
    cfg = toy.ToySwinConfig(path=str(tmp_path / "swin.pth"), model=toy.swin_fields(mcfg), **TINY_SWIN_BUILD)
    metrics = toy.build_toy_swin(cfg, mcfg, shapes_tok)
    assert metrics["val_s4_colour"] > 40  # 5 colours: chance is 20 %; measured 73 % after these 20 steps
    ckpt = torch.load(tmp_path / "swin.pth", weights_only=True)
    assert set(ckpt) == {"meta", "state_dict"} and ckpt["meta"]["toy_config"] == dataclasses.asdict(cfg)
    sd = ckpt["state_dict"]  # a Mask R-CNN Swin's names: Swin and its stage norms, the FPN's laterals; no QD-ATT
    assert {"backbone.patch_embed.proj.weight", "backbone.layers.1.blocks.1.attn.relative_position_bias_table",
            "backbone.layers.2.downsample.reduction.weight", "backbone.norm3.weight",
            *(f"neck.lateral_convs.{i}.conv.weight" for i in range(4))} <= set(sd)
    assert all(k.startswith(("backbone.patch_embed.", "backbone.layers.", "backbone.norm", "neck.lateral_convs."))
               and "qdatt" not in k for k in sd)
    torch.manual_seed(1)
    model = GroundingModel(mcfg)
    load_visual_checkpoint(model, str(tmp_path / "swin.pth"))
    assert f"loaded {len(sd)} tensors from {tmp_path / 'swin.pth'}; ignored 0; QD-ATT" in capsys.readouterr().out
    assert torch.equal(model.visual.neck.lateral[2].weight, sd["neck.lateral_convs.2.conv.weight"])
    assert torch.equal(model.visual.stages[1][1].mlp[0].weight, sd["backbone.layers.1.blocks.1.mlp.fc1.weight"])
    assert all(p.abs().sum() == 0 for k, p in model.visual.named_parameters() if k.endswith(".V"))  # QD-ATT: its init


def test_a_toy_swin_with_other_settings_is_refused_and_one_without_ours_used_as_given(tmp_path, tiny_config):
    mcfg = tiny_config(backbone="swin_toy_qrnet", swin=dict(TINY_SWIN), max_query_len=16)
    built = toy.ToySwinConfig(path=str(tmp_path / "swin.pth"), model=toy.swin_fields(mcfg), **TINY_SWIN_BUILD)
    torch.save({"meta": {"toy_config": dataclasses.asdict(built)}, "state_dict": {}}, built.path)  # a finished build
    prepare.check_world_files(str(tmp_path), None, built)  # the same settings: reused
    with pytest.raises(UsageError, match=r"the toy Swin .*swin.pth was built with other settings: steps 20 \(this "
                                         r"run: 600\)\. Delete it to rebuild it"):
        prepare.check_world_files(str(tmp_path), None, dataclasses.replace(built, steps=600))
    wider = {**built.model, "swin": {**TINY_SWIN, "embed_dim": 32}}
    with pytest.raises(UsageError, match=r"swin.pth was built with other settings: model .*'embed_dim': 16"):
        prepare.check_world_files(str(tmp_path), None, dataclasses.replace(built, model=wider))
    torch.save({"meta": {"mmdet_version": "2.11.0"}, "state_dict": {}}, built.path)  # a real Mask R-CNN's: not ours
    prepare.check_world_files(str(tmp_path), None, dataclasses.replace(built, steps=600))
    with pytest.raises(UsageError, match="swin.pth exists"):  # before any training
        toy.build_toy_swin(built, mcfg, None)
