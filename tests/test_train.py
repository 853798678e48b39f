"""train.py: schedule, checkpoints, resume, overfitting, non-finite losses, and a 2-process DDP run.

Run: python -m pytest -q tests/test_train.py       (the DDP test launches torchrun with 2 CPU processes)
"""
import functools
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, TINY_SWIN, torchrun

import data
import evaluate
import qrnet
import train
from clip_teacher import CLIPTeacher
from losses import total_loss
from machinery import run_folders
from machinery.checkpoints import FORMAT_VERSION, read_checkpoint
from machinery.flags import UsageError
from model import GroundingModel
from train import TrainConfig
from world.dataset import ShapesWorld


real_score = train.score


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -----------------------------------------------------------------------------
# schedule


def test_lr_is_a_pure_function_of_the_step():
    cfg = TrainConfig(lr_drop=2, warmup_steps=4)
    factors = [train.lr_factor(s, steps_per_epoch=5, cfg=cfg) for s in range(12)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4:10] == [1.0] * 6 and factors[10:] == [0.1, 0.1]
    cosine = TrainConfig(lr_schedule="cosine", warmup_steps=2, epochs=2)
    factors = [train.lr_factor(s, steps_per_epoch=5, cfg=cosine) for s in range(10)]
    assert factors[0] == 0.5 and factors[5] == pytest.approx(0.5) and 0 < factors[-1] < 0.03
    assert all(a > b for a, b in zip(factors[1:], factors[2:]))  # after the warmup, down every step


@pytest.mark.parametrize("epochs, lr_drop, factors", [
    (180, 60, {0: 1.0, 59: 1.0, 60: 0.1, 119: 0.1, 120: 0.01, 179: 0.01}),  # QRNet's StepLR(60) on 180: two drops
    (90, 60, {0: 1.0, 59: 1.0, 60: 0.1, 89: 0.1}),  # TransVG's: one
    (180, 120, {119: 1.0, 120: 0.1, 179: 0.1}),  # RefCOCO+'s: one
])
def test_the_step_schedule_is_steplrs_a_drop_every_lr_drop_epochs(epochs, lr_drop, factors):
    cfg = TrainConfig(epochs=epochs, lr_drop=lr_drop)
    for epoch, factor in factors.items():
        for step in (epoch * 7, epoch * 7 + 6):  # first and last step of the epoch, 7 steps an epoch
            assert train.lr_factor(step, steps_per_epoch=7, cfg=cfg) == pytest.approx(factor, rel=1e-12), epoch


# -----------------------------------------------------------------------------
# runs


@pytest.mark.parametrize("student", [[], ["--backbone=swin_toy_qrnet", f"--swin={json.dumps(TINY_SWIN)}"]],
                         ids=["transvg", "qrnet"])
def test_a_run_writes_plain_checkpoints_and_reports_what_a_fresh_evaluation_of_them_gives(student, tmp_path,
                                                                                          tiny_train_flags,
                                                                                          tiny_clip_dir, monkeypatch):
    scored = []
    monkeypatch.setattr(train, "score", lambda run, ds: scored.append(ds.split) or real_score(run, ds))
    out = train.main(tiny_train_flags(tmp_path, "--epochs=2", "--distill=cos", f"--teacher={tiny_clip_dir}", *student))
    assert out["step"] == 6 and out["test_n"] == 9
    assert scored == ["val", "val", "test"]  # the final table reuses the last epoch's val scores of the same weights
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # plain data only
    assert ckpt["step"] == 6 and ckpt["epoch"] == 2 and ckpt["format_version"] == FORMAT_VERSION
    assert ckpt["teacher"]["name"] == tiny_clip_dir and len(ckpt["teacher"]["sha256"]) == 64
    assert not any("clip" in k or "teacher" in k for k in ckpt["model"])  # the teacher is stored by name only
    assert [g["name"] for g in ckpt["optimizer"]["param_groups"]] == ["fusion", "visual", "text"]
    assert ckpt["world_config"]["shapes_train_size"] == 24 and ckpt["data_config"]["dataset"] == "shapes"
    assert (tmp_path / "best.pt").exists() and json.loads((tmp_path / "config.json").read_text())["grad_accum"] == 2
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert {"train_loss_box", "train_loss_giou", "train_distill_img", "train_distill_txt", "val_acc@0.5"} <= set(lines[0])
    model = GroundingModel.from_checkpoint(str(tmp_path / "last.pt"))
    assert model.cfg.imsize == 64 and not model.training
    if student:  # QRNet's QD-ATT trains: its V moved off zero
        assert isinstance(model.visual, qrnet.QRNetVisual) and model.visual.qdatt[3].spatial.V.abs().sum() > 0
    # the numbers the run reports are those of the model it saved, evaluated afresh (another batch size, no DDP)
    again = evaluate.main([f"--ckpt={tmp_path / 'last.pt'}", "--device=cpu", "--num_workers=0"])
    for split in ("val", "test"):
        assert again[split]["acc@0.5"] == out[f"{split}_acc@0.5"]
        assert again[split]["miou"] == pytest.approx(out[f"{split}_miou"], abs=1e-6)
    assert out["best_acc@0.5"] == read_checkpoint(str(tmp_path / "best.pt"))["best_metric"] >= out["val_acc@0.5"]


def test_how_often_a_run_evaluates_leaves_its_weights_bit_for_bit_the_same(tmp_path, tiny_train_flags):
    # evaluation draws nothing from the training's random streams (dropout, augmentation): evaluating after every
    # step and only at the end give the same final weights
    flags = ["--epochs=2", "--dropout=0.1", "--final_eval=false"]
    train.main(tiny_train_flags(tmp_path / "often", "--eval_every=1", *flags))
    train.main(tiny_train_flags(tmp_path / "once", "--eval_every=6", *flags))
    often, once = (read_checkpoint(str(tmp_path / d / "last.pt"))["model"] for d in ("often", "once"))
    assert often.keys() == once.keys() and all(torch.equal(often[k], once[k]) for k in often)


# 24 samples / batch 8 = 3 steps per epoch, 2 epochs, lr x0.1 from step 3: each run is cut short, then resumed to the
# end, and must end with the very weights and lrs of the run that was never interrupted
RESUMABLE = ["--epochs=2", "--lr_drop=1", "--lr_schedule=step", "--distill=cos", "--final_eval=false", "--save_every=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_train_flags):
    """The last.pt of a run with the given flags that nobody stopped, made once per set of flags."""
    @functools.cache
    def run(*flags: str) -> dict:
        out_dir = tmp_path_factory.mktemp("uninterrupted")
        train.main(tiny_train_flags(out_dir, *flags))
        return read_checkpoint(str(out_dir / "last.pt"))
    return run


def crash_at_step_4(real, *args):
    if args[-1] == 4:
        raise KeyboardInterrupt  # like a kill: nothing after this point runs
    return real(*args)


@pytest.mark.parametrize("stop, cached", [("max_steps", []), ("crash", []), ("fewer_epochs", []),
                                          ("max_steps", ["--cache_visual=true", "--augment=false"])],
                         ids=["max_steps", "crash", "fewer_epochs", "max_steps_cached_visual"])
def test_a_resumed_run_ends_bit_exactly_where_the_uninterrupted_one_does(stop, cached, tmp_path, tiny_train_flags,
                                                                         tiny_clip_dir, uninterrupted, monkeypatch,
                                                                         capsys):
    """Stopped after step 2 (--max_steps, mid-epoch), killed during its fifth step (last.pt one --save_every old, at
    step 4), or trained 1 epoch then resumed with --epochs 2 (a run made longer): the weights, optimizer state and lr
    it ends with are the uninterrupted run's, bit for bit (with the frozen branch cached too)."""
    flags = [*RESUMABLE, f"--teacher={tiny_clip_dir}", *cached]
    full = uninterrupted(*flags)
    cut = tmp_path / "cut"
    if stop == "crash":
        monkeypatch.setattr(train, "optimizer_step", functools.partial(crash_at_step_4, train.optimizer_step))
        with pytest.raises(KeyboardInterrupt):
            train.main(tiny_train_flags(cut, *flags))
        monkeypatch.undo()
        assert read_checkpoint(str(cut / "last.pt"))["step"] == 4
    else:
        train.main(tiny_train_flags(cut, *flags, "--max_steps=2" if stop == "max_steps" else "--epochs=1"))
    resumed = {"max_steps": ["--max_steps=0"], "crash": [], "fewer_epochs": ["--epochs=2"]}[stop]  # to the end
    assert train.main([f"--resume={cut / 'last.pt'}", "--device=cpu", *resumed])["step"] == 6
    if stop == "fewer_epochs":
        assert ("--epochs 2: the run, 1 epochs long so far, continues to step 6 with the lr schedule of 2 epochs "
                "(step)") in capsys.readouterr().out
        with pytest.raises(UsageError, match=r"--epochs 1: the run of --resume .* is 2 epochs long; a resumed run "
                                             r"can train longer, not shorter"):
            train.main([f"--resume={cut / 'last.pt'}", "--epochs=1"])
    ours = read_checkpoint(str(cut / "last.pt"))
    assert ours["step"] == full["step"] == 6 and ours["train_config"]["epochs"] == 2
    for k, v in full["model"].items():
        assert torch.equal(v, ours["model"][k]), k
    for group, theirs in zip(ours["optimizer"]["param_groups"], full["optimizer"]["param_groups"]):
        assert group["lr"] == theirs["lr"] == pytest.approx(2e-5)  # after the drop
    for k, state in full["optimizer"]["state"].items():
        assert all(torch.equal(v, ours["optimizer"]["state"][k][name]) for name, v in state.items())


def test_resume_takes_the_run_from_the_checkpoint_and_refuses_changes(tmp_path, tiny_train_flags):
    train.main(tiny_train_flags(tmp_path, "--max_steps=2", "--final_eval=false", "--lr=3e-4"))
    last = str(tmp_path / "last.pt")
    # only --resume and --max_steps: the dataset, model and lr come from the checkpoint, not from the defaults
    out = train.main([f"--resume={last}", "--max_steps=3", "--final_eval=false", "--device=cpu"])
    assert out["step"] == 3
    assert read_checkpoint(last)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(3e-4)
    with pytest.raises(ValueError, match=r"lr 0.0003 -> 0.001"):
        train.main([f"--resume={last}", "--max_steps=4", "--lr=1e-3"])


@pytest.mark.parametrize("cache", [[], ["--cache_visual=true", "--augment=false"]], ids=["", "cached_visual"])
def test_trainable_teacher_trains_saves_beside_the_student_and_resumes(tmp_path, tiny_train_flags, tiny_clip_dir,
                                                                       cache):
    # with the frozen visual branch cached, the canvases stay in the cache and the teacher still runs every step
    flags = ["--distill=cos", f"--teacher={tiny_clip_dir}", "--teacher_trainable", "--final_eval=false", *cache]
    train.main(tiny_train_flags(tmp_path, *flags, "--max_steps=2"))
    ckpt = read_checkpoint(str(tmp_path / "last.pt"))
    assert [g["name"] for g in ckpt["optimizer"]["param_groups"]] == ["fusion", "visual", "text", "teacher"]
    tuned = read_checkpoint(str(tmp_path / "last.pt.teacher"))["model"]
    original = CLIPTeacher(tiny_clip_dir, device="cpu").model.state_dict()
    assert not torch.equal(tuned["visual_projection.weight"], original["visual_projection.weight"])
    assert not any(k.startswith(("vision_model.", "text_model.")) for k in ckpt["model"])  # not in the student's
    out = train.main([f"--resume={tmp_path / 'last.pt'}", "--max_steps=3", "--final_eval=false"])
    assert out["step"] == 3


def test_overfitting_one_batch_drives_the_loss_down(tiny_config, shapes_tok):
    # the step train.py takes (its parameter groups, AdamW, eq. 8 loss) on one fixed batch of 8, 150 times; a ResNet to
    # layer3 as the synthetic world's recipe has it
    world = ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, image_size=64)
    batch = data.collate([world[i] for i in range(8)])
    cfg = TrainConfig(lr=3e-3, lr_visual=3e-3, lr_text=3e-3)
    torch.manual_seed(0)
    model = GroundingModel(tiny_config(max_query_len=16, dropout=0.0, resnet_stages=3,
                                       text_config={**tiny_config().text_config, "vocab_size": len(shapes_tok)}))
    optimizer = torch.optim.AdamW(train.param_groups(model, None, cfg), weight_decay=cfg.weight_decay)
    losses = []
    for _ in range(150):
        out = model(batch["image"], batch["img_is_pad"], batch["input_ids"], batch["attention_mask"])
        loss, _ = total_loss(out["pred_boxes"], batch["target"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    # against the best a model that ignores its input can do on this batch, about: one box for all, the mean (1.89).
    # The last 10 steps averaged 0.16 (one thread) and 0.38 (two) when written: the float order moves the path
    constant, _ = total_loss(batch["target"].mean(0, keepdim=True).expand(8, -1), batch["target"])
    assert sum(losses[-10:]) / 10 < constant.item() / 3, (constant.item(), losses[::15])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_train_flags, monkeypatch):
    train.main(tiny_train_flags(tmp_path, "--max_steps=2", "--final_eval=false"))
    before = digest(tmp_path / "last.pt")
    real = train.total_loss

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        terms["loss_giou"] = terms["loss_giou"] * float("nan")
        return loss * float("nan"), terms

    monkeypatch.setattr(train, "total_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at optimizer step 2: .*loss_giou.*nan"):
        train.main(tiny_train_flags(tmp_path, "--max_steps=4", f"--resume={tmp_path / 'last.pt'}"))
    assert digest(tmp_path / "last.pt") == before


@pytest.mark.slow
def test_two_process_ddp_run_matches_across_ranks_and_counts_exactly(tmp_path, tiny_train_flags):
    run = torchrun("tests/ddp_worker.py", *tiny_train_flags(tmp_path, "--epochs=1", "--batch_size=8",
                                                            "--micro_batch=2", "--shapes_eval_size=9"))
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the replicas identical
    assert "grad_accum\": 2" in (tmp_path / "config.json").read_text()  # 8 = 2 per rank x 2 ranks x 2 steps
    # evaluation over 2 ranks on a 9-sample split counts every sample once: same as one process
    single = evaluate.main([f"--ckpt={tmp_path / 'last.pt'}", "--split=val", "--device=cpu", "--num_workers=0"])
    for r in ranks:
        assert r["metrics"]["val_n"] == single["val"]["n"] == 9
        for k in ("acc@0.5", "acc@0.75"):
            assert r["metrics"][f"val_{k}"] == single["val"][k]
        assert r["metrics"]["val_miou"] == pytest.approx(single["val"]["miou"], abs=1e-6)


@pytest.mark.slow
def test_two_process_step_equals_one_process_step_on_the_same_global_batch(tmp_path, tiny_train_flags):
    # no dropout and TransVG's frozen BN: nothing depends on how the 8 images are split over ranks and micro-batches
    quiet = ['--text_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, '
             '"intermediate_size": 64, "max_position_embeddings": 32, "hidden_dropout_prob": 0, '
             '"attention_probs_dropout_prob": 0}', "--dropout=0", "--trainable_bn=false", "--max_steps=2",
             "--final_eval=false"]
    run = torchrun("tests/ddp_worker.py", *tiny_train_flags(tmp_path / "two", *quiet, "--micro_batch=2"))
    assert run.returncode == 0, run.stderr[-3000:]
    train.main(tiny_train_flags(tmp_path / "one", *quiet, "--micro_batch=4"))  # 8 = 4 x 2 accumulation steps
    train.main(tiny_train_flags(tmp_path / "first", *quiet, "--micro_batch=4", "--max_steps=1"))
    two, one, first = (read_checkpoint(str(tmp_path / d / "last.pt"))["model"] for d in ("two", "one", "first"))
    for k, v in one.items():
        if k.endswith("in_proj_bias"):
            # the key bias [D:2D] adds the same score to every key, so softmax makes its gradient exactly zero and
            # what arrives is rounding noise, which Adam's g/sqrt(v) scales up to ~lr in either direction
            d = v.shape[0] // 3
            two[k], v = torch.cat([two[k][:d], two[k][2 * d:]]), torch.cat([v[:d], v[2 * d:]])
        if k.endswith("attention.self.key.bias"):  # BERT's key bias: the same reason
            continue
        assert torch.allclose(two[k], v, atol=1e-5, rtol=1e-4), k
    # and the comparison means something: one AdamW step (lr 2e-4) moves weights 10x more than that tolerance
    assert (one["bbox_head.4.weight"] - first["bbox_head.4.weight"]).abs().max() > 1e-4


# -----------------------------------------------------------------------------
# runs never destroy each other, a crash loses minutes, bad input is refused up front


def test_a_folder_that_holds_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, tiny_train_flags):
    train.main(tiny_train_flags(tmp_path, "--max_steps=2", "--final_eval=false"))
    before = digest(tmp_path / "last.pt")
    with pytest.raises(UsageError, match=f"--out_dir {tmp_path} holds a run \\(last.pt, best.pt, log.jsonl, "
                                                 f"config.json\\): pass --resume {tmp_path / 'last.pt'} to continue "
                                                 f"it, --overwrite"):
        train.main(tiny_train_flags(tmp_path, "--max_steps=1", "--final_eval=false", "--lr=1e-3"))
    assert digest(tmp_path / "last.pt") == before  # untouched
    train.main(tiny_train_flags(tmp_path, "--max_steps=1", "--final_eval=false", "--overwrite"))
    assert read_checkpoint(str(tmp_path / "last.pt"))["step"] == 1
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1  # the old run's log went with it


def test_without_out_dir_a_run_takes_the_next_free_folder(tmp_path, tiny_train_flags, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = [f for f in tiny_train_flags(tmp_path, "--max_steps=1", "--final_eval=false", "--save_every=0")
             if not f.startswith("--out_dir")]
    train.main(flags)
    train.main(flags)
    assert (tmp_path / "out" / "shapes" / "last.pt").exists() and (tmp_path / "out" / "shapes_2" / "last.pt").exists()


def test_two_runs_cannot_share_a_folder(tmp_path, tiny_train_flags):
    lock = run_folders.lock_run_dir(str(tmp_path))  # another run holds it
    try:
        with pytest.raises(UsageError, match=f"{tmp_path} is in use by another run \\(pid {os.getpid()}\\)"):
            train.main(tiny_train_flags(tmp_path, "--max_steps=1", "--final_eval=false"))
    finally:
        lock.close()
    assert not (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("flag, message", [
    ("--dataset=refcocoo", "--dataset: expected one of refcoco, refcoco+"), ("--micro_batch=0", "--micro_batch: expected >= 1"),
    ("--lr=-1", "--lr: expected > 0, got -1.0"), ("--epochs=0", "--epochs: expected >= 1, got 0"),
    ("--distill_loc=loc5", "--distill_loc: expected one of loc1, loc2, loc3, loc4, got 'loc5'"),
    ("--imsize=100", "--imsize: expected a multiple of the stride"), ("--pos_std=-0.1", "--pos_std: expected >= 0, got -0.1"),
    ("--lr_schedule=linear", "--lr_schedule: expected one of step, cosine"),
    ("--distill=kl", "--distill: expected one of cos, l1, none, got 'kl'"),
    ("--resnet_stages=2", "--resnet_stages: expected 4, or 3 for an undilated ResNet"),
])
def test_bad_values_are_refused_when_the_flags_are_read(flag, message, tmp_path, tiny_train_flags, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_train_flags(tmp_path, flag))
    assert message in capsys.readouterr().err
    assert not tmp_path.joinpath("config.json").exists()


def test_a_query_longer_than_berts_position_table_is_refused_before_training(tmp_path, tiny_train_flags):
    with pytest.raises(ValueError, match="--max_query_len 40 is more than the text encoder .* holds: its position "
                                         "table has 32 rows"):
        train.main(tiny_train_flags(tmp_path, "--max_query_len=40"))
    assert not tmp_path.joinpath("config.json").exists()


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("script, flags, message", [
    ("train.py", ["--device=cpu", "--text_encoder={tmp}/typo"], "error: --text_encoder {tmp}/typo: no folder"),
    ("evaluate.py", ["--ckpt={tmp}/missing.pt"], "error: --ckpt {tmp}/missing.pt: no such checkpoint file"),
    ("tools/bench.py", ["--device=cpu", "--dtype=bfloat16"], "error: --dtype bfloat16 needs CUDA"),
    ("world/toy_clip.py", ["--out_dir={tmp}"], "error: --out_dir {tmp} exists"),
])
def test_each_script_says_a_mistake_in_one_line_with_exit_status_2(script, flags, message, tmp_path):
    before = listing(tmp_path)
    run = subprocess.run([sys.executable, os.path.join(ROOT, script), *(f.format(tmp=tmp_path) for f in flags)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith(message.format(tmp=tmp_path)) and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert listing(tmp_path) == before


@pytest.mark.slow
def test_under_torchrun_every_rank_stops_and_the_message_is_printed_once(tmp_path):
    run = torchrun("train.py", "--device=cpu", "--shapes_train_size=8", "--micro_batch=32", cwd=tmp_path)
    said = "error: --shapes_train_size 8: fewer training samples than one batch"
    assert run.returncode != 0 and (run.stdout + run.stderr).count(said) == 1, run.stderr[-3000:]
    # torchrun's own report of the failed processes follows (its ChildFailedError): the first to exit did so with
    # status 2; the other either did too or was stopped by torchrun first (which one wins is a race on a busy machine)
    assert "exitcode  : 2" in run.stderr and listing(tmp_path) == []


def test_resuming_a_file_train_py_did_not_write_says_what_it_is(tmp_path):
    sd = {"vl_pos_embed.weight": torch.zeros(3, 2), "visumodel.backbone.0.body.conv1.weight": torch.zeros(1)}
    torch.save({"model": sd, "args": {}}, tmp_path / "TransVG_unc.pth")
    with pytest.raises(ValueError, match="an official TransVG checkpoint, not a last.pt of train.py.*evaluate.py "
                                         "--ckpt .*--visual_init"):
        train.main([f"--resume={tmp_path / 'TransVG_unc.pth'}"])
    torch.save({"model": {}, "train_config": {}, "format_version": 3, "git_sha": "abc"}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match=f"format 3 \\(git abc\\), from before this code's first release; this one "
                                         f"reads format {FORMAT_VERSION}"):
        train.main([f"--resume={tmp_path / 'old.pt'}"])
