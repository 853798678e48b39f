"""interop.py: official TransVG checkpoints (fabricated here from our models) load and predict the same.

Run: python -m pytest -q tests/test_interop.py
Parity with the *official* code's outputs: tests/test_transvg_parity.py (needs its reference files).
"""
import argparse

import pytest
import torch
from conftest import ours_to_transvg

from interop import load_model, transvg_config, transvg_to_ours
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
