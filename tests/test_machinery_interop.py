"""machinery/interop.py: official TransVG checkpoints (fabricated here from our models) load and predict the same; DETR
checkpoints and torchvision ResNets initialise a visual branch; wrong files say so.

Run: python -m pytest -q tests/test_machinery_interop.py
Parity with the *official* codes' outputs: tests/test_model.py (TransVG) and tests/test_qrnet.py (QRNet), with their
reference files. QRNet's and the detectors' formats: tests/test_qrnet.py, tests/test_model.py.
"""
import argparse

import pytest
import torch
import torchvision
from conftest import ours_to_transvg

from machinery.flags import UsageError
from machinery.interop import load_model, load_visual_checkpoint, transvg_config, transvg_to_ours
from model import GroundingModel, example_inputs


def transvg_checkpoint(model):
    """An official-format TransVG checkpoint made from one of our models: pooler added, args pickled."""
    sd = ours_to_transvg(model.state_dict(), model.cfg.max_query_len)
    H = model.text_encoder.config.hidden_size
    sd["textmodel.bert.pooler.dense.weight"], sd["textmodel.bert.pooler.dense.bias"] = torch.zeros(H, H), torch.zeros(H)
    args = argparse.Namespace(imsize=model.cfg.imsize, max_query_len=model.cfg.max_query_len, dilation=False,
                              vl_nheads=model.cfg.nheads, bert_model="bert-base-uncased", backbone="resnet18")
    return {"model": sd, "optimizer": {}, "epoch": 89, "args": args, "val_accu": 0.8}


def test_transvg_checkpoint_loads_and_predicts_the_same(model, tmp_path):
    path = tmp_path / "TransVG_tiny.pth"
    torch.save(transvg_checkpoint(model), path)
    loaded = load_model(str(path))
    assert loaded.cfg.backbone == "resnet18" and loaded.cfg.max_query_len == 8 and not loaded.training
    x = example_inputs(model.cfg)
    assert torch.allclose(loaded(**x)["pred_boxes"], model(**x)["pred_boxes"], atol=1e-6)


def test_transvg_key_mapping_round_trips_and_reorders_position_rows(model):
    ours = model.state_dict()
    L, N = model.cfg.max_query_len, model.num_visual
    official = ours_to_transvg(ours, L)
    assert all(k.startswith(("visumodel.", "textmodel.bert.", "vl_", "reg_token", "visu_proj", "text_proj", "bbox_embed"))
               for k in official)
    back = transvg_to_ours(official, L)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    # official rows: [REG, L text, N visual]; ours: [REG, N visual, L text]
    rows = torch.arange(1 + L + N, dtype=torch.float32)[:, None].expand(-1, 2)
    mapped = transvg_to_ours({**official, "vl_pos_embed.weight": rows}, L)["pos_embed"][:, 0]
    assert mapped.tolist() == [0] + list(range(1 + L, 1 + L + N)) + list(range(1, 1 + L))


def test_transvg_architecture_is_inferred_from_shapes(tiny_config):
    torch.manual_seed(0)
    big = GroundingModel(tiny_config(backbone="resnet50", dilation=True, imsize=64, max_query_len=6))
    sd = ours_to_transvg(big.state_dict(), 6)
    cfg = transvg_config(sd, {"imsize": 64, "dilation": True})
    assert (cfg.backbone, cfg.dilation, cfg.max_query_len, cfg.enc_layers, cfg.vl_layers) == ("resnet50", True, 6, 2, 2)
    assert cfg.text_config["hidden_size"] == 64 and cfg.text_config["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="max_query_len=20"):
        transvg_config(sd, {"imsize": 64, "dilation": True, "max_query_len": 20})


# -----------------------------------------------------------------------------
# detectors and ResNets: a new student's visual branch


def detr_checkpoint(model):
    """A DETR-format checkpoint fabricated from a model's visual weights, with DETR's extra keys and pickled args."""
    sd = {}
    for k, v in model.visual.state_dict().items():
        if k.startswith("backbone."):
            sd["backbone.0.body." + k[len("backbone."):]] = v.clone()
        elif k.startswith("input_proj."):
            sd[k] = v.clone()
        elif k.startswith("encoder.layers."):
            sd["transformer.encoder.layers." + k[len("encoder.layers."):]] = v.clone()
    sd["transformer.decoder.layers.0.linear1.weight"] = torch.zeros(4, 4)
    sd["query_embed.weight"] = torch.zeros(100, 32)
    sd["class_embed.weight"] = torch.zeros(92, 32)
    return {"model": sd, "args": argparse.Namespace(backbone="resnet18", lr=1e-4), "epoch": 3}


def test_detr_checkpoint_initialises_the_visual_branch(tiny_config, tmp_path, capsys):
    torch.manual_seed(1)
    source = GroundingModel(tiny_config())
    path = tmp_path / "detr.pth"
    torch.save(detr_checkpoint(source), path)
    torch.manual_seed(2)
    model = GroundingModel(tiny_config())
    load_visual_checkpoint(model, str(path))
    for k, v in source.state_dict().items():
        if k.startswith("visual."):
            assert torch.equal(model.state_dict()[k], v), k
    assert not torch.equal(model.state_dict()["fusion.layers.0.linear1.weight"],
                           source.state_dict()["fusion.layers.0.linear1.weight"])
    assert "ignored 3" in capsys.readouterr().out


def test_torchvision_resnet_state_dict_initialises_the_backbone(tiny_config, tmp_path):
    resnet = torchvision.models.resnet18()  # plain BatchNorm2d: num_batches_tracked and fc.* must be dropped
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = GroundingModel(tiny_config())
    load_visual_checkpoint(model, str(path))
    assert torch.equal(model.visual.backbone.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)
    assert torch.equal(model.visual.backbone.bn1.running_var, resnet.bn1.running_var)


def test_bad_visual_checkpoints_fail_with_clear_messages(tiny_config, tmp_path):
    model = GroundingModel(tiny_config())
    with pytest.raises(UsageError, match="nowhere.pth: no such checkpoint file"):
        load_visual_checkpoint(model, str(tmp_path / "nowhere.pth"))
    wrong_depth = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), wrong_depth)
    with pytest.raises(ValueError, match="does not fit backbone=resnet18"):
        load_visual_checkpoint(model, str(wrong_depth))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_visual_checkpoint(model, str(junk))
    other = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match="expected a DETR checkpoint"):
        load_visual_checkpoint(model, str(other))
