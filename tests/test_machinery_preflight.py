"""machinery/preflight.py: every mistake is found before anything is built, downloaded or written, and said in one
message; flags that contradict each other, each rule in one place.

Run: python -m pytest -q tests/test_machinery_preflight.py
"""
import os

import pytest
import torch
from test_data import fabricate, make_split

import data
import train
from machinery import preflight
from machinery.flags import UsageError


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# what a user typed on the synthetic world (the preset's defaults, out/ under tmp_path) -> the one message it gets
@pytest.mark.parametrize("flags, message", [
    (["--device=cuda"], r"--device cuda: this machine has no CUDA GPU .*; pass --device cpu"),
    (["--resume={tmp}/hostname"], r"--resume .*hostname: not a PyTorch checkpoint \(torch.load cannot read it\)$"),
    (["--max_query_len=600"], r"--max_query_len 600 is more than the text encoder 'world/toy_models/vocab' holds: its "
                              r"position table has 32 rows"),
    (["--shapes_train_size=8"], r"--shapes_train_size 8: fewer training samples than one batch \(--batch_size 64\)"),
    (["--text_encoder={tmp}/typo/vocab"], r"--text_encoder .*/typo/vocab: no folder .*/typo/vocab; the synthetic "
                                          r"world's vocabulary ships at world/toy_models/vocab"),
    (["--teacher={tmp}/typo/clip"], r"--teacher (.*/typo/clip): no folder .*; the toy CLIP ships at "
                                    r"world/toy_models/clip \(built there when missing\); to build one at \1 on purpose: "
                                    r"python world/toy_clip.py --out_dir \1 --steps 600 --imsize 64 "
                                    r"--shapes_image_size 128$"),
    (["--visual_init={tmp}/typo/detr.pth"], r"--visual_init .*/typo/detr.pth: no such file; the toy DETR and the toy "
                                            r"Swin ship at world/toy_models/detr.pth and world/toy_models/swin.pth"),
    (["--batch_size=96"], r"--batch_size 96: must be a multiple of micro_batch x processes = 64 x 1"),
    (["--augment"], r"--cache_visual: expected false with --augment \(the cache holds one unaugmented view\)"),
    (["--backbone=swin_toy_qrnet", "--cache_visual"], r"--cache_visual: QRNet's visual branch depends on the "
                                                       r"expression, so it cannot be cached"),
    (["--distill_loc=loc4"], r"--cache_visual: --distill_loc loc4 reads its image feature inside the frozen visual "
                             r"branch, which cannot learn from it; use loc1 or loc2, --distill_modality text, or "
                             r"--cache_visual false"),
    (["--eval_split=testA"], r"--eval_split testA: shapes has no such split; valid: train, val, test"),
], ids=["device", "resume_not_a_checkpoint", "max_query_len", "fewer_than_a_batch", "text_encoder_typo",
        "teacher_typo", "visual_init_typo", "batch_multiple", "cache_augmented", "cache_qrnet", "cache_loc4",
        "split"])
def test_a_mistake_is_one_message_before_anything_is_written(flags, message, tmp_path, monkeypatch):
    if "--device=cuda" in flags and torch.cuda.is_available():
        pytest.skip("checks the refusal on a machine without a GPU")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hostname").write_text("build-machine-7\n")  # a file that is no checkpoint
    before = listing(tmp_path)
    with pytest.raises(UsageError, match=message):
        train.main(["--device=cpu", *(f.format(tmp=tmp_path) for f in flags)])
    assert listing(tmp_path) == before  # no out/shapes, no lock, no vocabulary, no toy model, no typo'd folder


def test_a_real_run_lists_every_missing_input_at_once_and_dry_run_checks_them(tmp_path, monkeypatch, tiny_clip_dir,
                                                                                capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as info:
        train.main(["--dataset=refcoco", "--device=cpu"])
    message = str(info.value)
    assert message.startswith("5 problems, found before anything was built or written:")
    for missing in ("--text_encoder bert-base-uncased: not in the local Hugging Face cache",
                    "--teacher openai/clip-vit-base-patch16: not in the local Hugging Face cache",
                    "checkpoints/detr-r50-unc.pth not found", "data/unc/unc_train.pth, data/unc/unc_val.pth, "
                    "data/unc/unc_testA.pth, data/unc/unc_testB.pth not found. Download the TransVG split indices",
                    "image folder ln_data/other/images/mscoco/images/train2014 not found: put the COCO train2014"):
        assert missing in message
    assert listing(tmp_path) == []  # no out/refcoco
    # everything in place (stand-ins: the check looks for the files, it does not load them)
    for split in ("train", "val", "testA", "testB"):
        os.makedirs("data/unc", exist_ok=True)
        torch.save([("1.jpg", 0, [0, 0, 5, 5], "the cat", [])], f"data/unc/unc_{split}.pth")
    os.makedirs("ln_data/other/images/mscoco/images/train2014")
    os.makedirs("checkpoints")
    (tmp_path / "checkpoints" / "detr-r50-unc.pth").write_bytes(b"stand-in")
    from transformers import BertConfig
    BertConfig(max_position_embeddings=16).save_pretrained("bert")
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\ncat\n")
    flags = ["--dataset=refcoco", "--device=cpu", "--text_encoder=bert", f"--teacher={tiny_clip_dir}"]
    with pytest.raises(UsageError, match=r"^--max_query_len 20 is more than the text encoder 'bert' holds: "
                                                 r"its position table has 16 rows$"):  # read from its config.json
        train.main(flags)
    before = listing(tmp_path)
    assert train.main([*flags, "--max_query_len=16", "--dry_run"]) == {}
    assert "all inputs found (--dry_run: nothing written)" in capsys.readouterr().out
    assert listing(tmp_path) == before


def test_a_location_inside_the_frozen_branch_is_refused_only_where_its_image_term_would_run():
    cfg, dcfg, mcfg, _ = train.read_flags(["--distill_loc=loc3"])  # the recipe: a frozen, cached branch
    env = train.runtime.DeviceEnv(torch.device("cpu"), False, 0, 0, 1)
    assert any("--distill_loc loc3" in p for p in preflight.flag_conflicts(cfg, dcfg, mcfg, env))
    for other in (["--distill_modality=text"], ["--distill=none"], ["--distill_loc=loc2"],
                  ["--cache_visual=false", "--distill_loc=loc3"]):
        cfg, dcfg, mcfg, _ = train.read_flags(["--distill_loc=loc3", *other])
        assert preflight.flag_conflicts(cfg, dcfg, mcfg, env) == [], other


def test_missing_split_files_and_image_folders_are_said_with_where_they_come_from(tmp_path):
    cfg = data.DataConfig("refcoco", split_root=str(tmp_path / "splits"), data_root=str(tmp_path / "images"))
    assert preflight.missing_inputs(cfg, ["val"])[0].startswith(f"--split_root {tmp_path / 'splits'}: "
                                                                f"{tmp_path / 'splits'}/unc/unc_val.pth not found. "
                                                                f"Download the TransVG split indices")
    make_split(tmp_path, "refcoco", "val", [("a.jpg", 0, [1, 1, 5, 5], "x", [])])
    assert preflight.missing_inputs(cfg, ["val"]) == [
        f"--data_root {tmp_path / 'images'}: image folder {tmp_path / 'images'}/other/images/mscoco/images/train2014 "
        f"not found: put the COCO train2014 images (cocodataset.org) there, or pass --data_root"]
    fabricate(tmp_path, "refcoco")
    assert preflight.missing_inputs(cfg, ["val"]) == []


def test_a_benchmark_split_smaller_than_a_batch_is_refused_once_read(tmp_path, tiny_train_flags, tiny_clip_dir):
    fabricate(tmp_path, "refcoco", n=3, split="train")
    fabricate(tmp_path, "refcoco", n=2, split="val")
    flags = [f for f in tiny_train_flags(tmp_path / "run") if not f.startswith("--shapes_")]
    with pytest.raises(UsageError, match=r"^refcoco train: 3 samples: fewer training samples than one batch "
                                         r"\(--batch_size 8\); give at least 8, or a smaller --batch_size$"):
        train.main([*flags, "--dataset=refcoco", f"--split_root={tmp_path / 'splits'}", "--final_eval=false",
                    f"--data_root={tmp_path / 'images'}", "--max_query_len=16", "--text_init=random"])


def test_find_pretrained_looks_on_disk_then_in_the_cache_then_asks_the_hub_once(tmp_path, monkeypatch):
    import huggingface_hub

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n")
    assert preflight.find_pretrained(str(tmp_path / "bert"), "vocab.txt") is None
    assert preflight.find_pretrained(str(tmp_path / "bert")) == f"the folder {tmp_path / 'bert'} holds no config.json"
    assert preflight.find_pretrained(str(tmp_path / "typo")) == f"no folder {tmp_path / 'typo'}"
    assert "hub is off (HF_HUB_OFFLINE)" in preflight.find_pretrained("nobody/no-such-bert")  # conftest: offline
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def unreachable(url, timeout):
        asked.append(timeout)
        raise ConnectionError("no route to host")
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    assert preflight.find_pretrained("nobody/no-such-bert") == ("not in the local Hugging Face cache and the hub could "
                                                              "not be reached (ConnectionError)")
    assert asked == [5.0]  # once, with a short timeout
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda name, filename: "/cache/config.json")
    assert preflight.find_pretrained("nobody/no-such-bert") is None and len(asked) == 1  # cached: the hub not asked
