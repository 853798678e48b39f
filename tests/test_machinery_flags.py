"""machinery/flags.py: the dataclass command line every script shares, and a user's mistake as one message.

Run: python -m pytest -q tests/test_machinery_flags.py
"""
import dataclasses

import pytest

import data
import train
from machinery.flags import UsageError, check_fields, cli, parse_config
from machinery.recipes import recipe
from world.recipe import WorldConfig

TRAIN_TYPES = [train.TrainConfig, data.DataConfig, train.ModelConfig]


def test_flags_take_both_forms_convert_types_and_apply_presets():
    cfg, dcfg, mcfg = parse_config(["--dataset", "refcoco+", "--lr=1", "--teacher_trainable", "--backbone",
                                    "resnet101", "--augment=false"], TRAIN_TYPES, recipe)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.teacher_trainable and not cfg.augment
    assert (dcfg.dataset, cfg.epochs, cfg.lr_drop, mcfg.backbone, mcfg.visual_init) == (
        "refcoco+", 180, 120, "resnet101", "detr")
    cfg, _, mcfg = parse_config(["--dataset=refcocog", "--max_query_len=30"], TRAIN_TYPES, recipe)
    assert (cfg.epochs, mcfg.max_query_len) == (90, 30)  # the flag beats the preset's 40


def test_dict_fields_take_json():
    _, _, mcfg, _ = parse_config(['--text_config={"hidden_size": 64}'], TRAIN_TYPES, recipe)
    assert mcfg.text_config == {"hidden_size": 64}


def test_the_worlds_flags_exist_on_the_world_only(capsys):
    *_, wcfg = parse_config(["--shapes_train_size=8"], TRAIN_TYPES, recipe)  # --dataset shapes: the default
    assert wcfg == WorldConfig(shapes_train_size=8)
    with pytest.raises(SystemExit):
        parse_config(["--dataset=refcoco", "--shapes_train_size=8"], TRAIN_TYPES, recipe)
    assert "unrecognized arguments: --shapes_train_size=8" in capsys.readouterr().err


def test_choices_are_checked_and_listed_from_one_tuple(capsys):
    @dataclasses.dataclass
    class Picky:
        kind: str = "a"  # which kind

        CHOICES = {"kind": ("a", "b")}

        def __post_init__(self) -> None:
            check_fields(self)

    with pytest.raises(UsageError, match="--kind: expected one of a, b, got 'c'"):
        Picky("c")
    with pytest.raises(SystemExit):
        parse_config(["--help"], [Picky])
    assert "which kind {a, b} (default: a)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv,message", [(["--epochs=1e4"], "invalid int"), (["--lr", "fast"], "invalid float"),
                                          (["--no_such_key=1"], "unrecognized"), (["--augment=maybe"], "true/false")])
def test_bad_flags_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv, TRAIN_TYPES, recipe)
    assert message in capsys.readouterr().err


def test_help_lists_every_field_with_its_comment_and_the_presets_value(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # as one line: argparse wraps the help to the terminal
    for cls in TRAIN_TYPES:
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in out, f.name
    assert "ResNet and DETR encoder" in out  # a trailing comment became help text
    assert "(default: resnet18; the shapes preset's)" in out  # --backbone under the default dataset's, not resnet50
    assert "(default: 0.0001)" in out  # --weight_decay: TrainConfig's own, which no preset of shapes changes
    with pytest.raises(SystemExit):
        train.main(["--dataset=refcoco+", "--backbone=swin_s_qrnet", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 180; the refcoco+ QRNet preset's)" in out and "(default: mask_rcnn; the refcoco+ QRNet" in out


def test_cli_says_a_usage_error_once_and_exits_2_but_a_bug_keeps_its_traceback(capsys, monkeypatch):
    def refused():
        raise UsageError("--lr 7: too high")

    with pytest.raises(SystemExit) as info:
        cli(refused)
    assert info.value.code == 2 and capsys.readouterr().err == "error: --lr 7: too high\n"
    monkeypatch.setenv("RANK", "1")  # under torchrun, rank 0 alone says it; every rank exits
    with pytest.raises(SystemExit) as info:
        cli(refused)
    assert info.value.code == 2 and capsys.readouterr().err == ""

    def bug():
        raise KeyError("a bug")
    with pytest.raises(KeyError):  # not caught: its traceback is what a developer needs
        cli(bug)
