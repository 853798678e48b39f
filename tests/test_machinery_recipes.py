"""machinery/recipes.py: the recipe each --dataset and student starts from (the paper's, QRNet's on top, the synthetic
world's), and what resolve() fills in before anything is built.

Run: python -m pytest -q tests/test_machinery_recipes.py
(--help naming the recipe that sets a value: tests/test_machinery_flags.py.)
"""
import pytest

import data
import train
from machinery.flags import UsageError
from machinery.recipes import recipe, resolve
from world.recipe import SHAPES, SHAPES_QRNET, WorldConfig


def values(dataset: str, backbone: str) -> dict:
    return recipe({"dataset": dataset, "backbone": backbone})[1]


def test_the_paper_per_dataset_and_qrnets_recipe_on_top():
    assert values("refcoco", "resnet50")["visual_init"] == "detr" and "epochs" not in values("refcoco", "resnet50")
    assert (values("refcoco+", "resnet50")["epochs"], values("refcoco+", "resnet50")["lr_drop"]) == (180, 120)
    assert values("refcocog", "resnet101")["max_query_len"] == 40
    qr = values("refcoco", "swin_s_qrnet")
    assert (qr["visual_init"], qr["epochs"], qr["lr_drop"], qr["batch_size"]) == ("mask_rcnn", 180, 60, 128)
    assert values("refcoco+", "swin_s_qrnet")["lr_drop"] == 120
    assert values("refcocog", "swin_s_qrnet")["max_query_len"] == 40
    assert values("referit", "swin_s_qrnet")["batch_size"] == 64
    assert recipe({"dataset": "refcoco", "backbone": "swin_s_qrnet"})[::2] == ("refcoco QRNet", [])
    # the paper's recipe for a QRNet student is one flag away: TransVG's schedule and batch, QRNet's detector init
    name, paper, _ = recipe({"dataset": "refcoco", "backbone": "swin_s_qrnet", "qrnet_recipe": "paper"})
    assert paper == {**values("refcoco", "resnet50"), "visual_init": "mask_rcnn"} and "paper's recipe" in name
    cfg, *_ = train.read_flags(["--dataset=refcoco", "--backbone=swin_s_qrnet", "--qrnet_recipe=paper"])
    assert (cfg.epochs, cfg.lr_drop, cfg.batch_size) == (90, 60, 64)


def test_the_synthetic_world_brings_its_recipes_and_its_flags():
    name, toy_qrnet, more = recipe({"dataset": "shapes", "backbone": "swin_toy_qrnet"})
    assert name == "shapes QRNet" and more == [WorldConfig] and toy_qrnet == {**SHAPES, **SHAPES_QRNET}
    assert (toy_qrnet["visual_init"], toy_qrnet["cache_visual"]) == ("world/toy_models/swin.pth", False)
    assert toy_qrnet["lr_visual"] < toy_qrnet["lr"]  # QRNet's split: the pretrained Swin and laterals learn slower
    assert toy_qrnet["teacher"] == SHAPES["teacher"]  # one toy CLIP for both students
    assert recipe({"dataset": "refcocoo", "backbone": "resnet50"})[1] == {}  # DataConfig says what is wrong


def test_resolve_finds_the_official_detector_under_checkpoint_dir(tmp_path):
    dcfg = data.DataConfig("refcoco")
    mcfg = train.ModelConfig(backbone="swin_s_qrnet", visual_init="mask_rcnn", text_init="random",
                             text_config={"hidden_size": 64})
    with pytest.raises(UsageError, match=r"unc_latest.pth not found.*Mask R-CNN Swin-S"):
        resolve(dcfg, mcfg, str(tmp_path), 100)
    (tmp_path / "unc_latest.pth").write_bytes(b"")
    resolved = resolve(dcfg, mcfg, str(tmp_path), 100)
    assert resolved.visual_init == str(tmp_path / "unc_latest.pth")
    assert resolved.text_config["vocab_size"] == 100 and resolved.text_config["num_hidden_layers"] == 12  # BERT's own
    with pytest.raises(UsageError, match="mask_rcnn_swin_small_patch4_window7.pth"):
        resolve(data.DataConfig("flickr30k"), mcfg, str(tmp_path), 100)
