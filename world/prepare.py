"""Before a run on the synthetic world: the files it loads that nobody can download, made once and checked.

    prepare(needed(cfg, mcfg), wcfg, teacher, env)   # train.py, on --dataset shapes: vocabulary, toy CLIP, detector

The student's BERT vocabulary, the CLIP teacher and the detector its visual branch starts from are made on the world
once, cached under out/ and loaded through the same flags as real ones, only at the recipes' paths (TOY_PATHS): a
typed path is used as it is or refused, never filled. One made with other settings than the run asks for is refused,
never reused (check_world_files). check_inputs is the world's part of machinery/preflight.py.
"""

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch

import data
import qrnet
from machinery.checkpoints import read_checkpoint
from machinery.flags import UsageError
from machinery.preflight import check_one_batch
from machinery.runtime import DeviceEnv, print0
from model import NAMED_VISUAL_INITS, ModelConfig
from world import scenes
from world.dataset import write_vocab
from world.recipe import SHAPES, SHAPES_QRNET, WorldConfig
from world.toy_clip import ToyCLIPConfig, build_toy_teacher
from world.toy_detectors import VISUAL_FIELDS, ToyDETRConfig, ToySwinConfig, build_toy_detr, build_toy_swin, swin_fields

# The only paths prepare builds toy models at, when they are missing: the recipes' own (one toy CLIP serves both
# students; the toy DETR is TransVG's, the toy Swin QRNet's)
TOY_PATHS = {"text_encoder": (SHAPES["text_encoder"],), "teacher": (SHAPES["teacher"],),
             "visual_init": (SHAPES["visual_init"], SHAPES_QRNET["visual_init"])}

# -----------------------------------------------------------------------------
# before the run: what it will build, what it cannot


def check_inputs(cfg, wcfg: WorldConfig, mcfg: ModelConfig) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """The world's part of preflight.check_inputs (cfg: the TrainConfig), creating nothing: (problems; {flag: note}
    for each toy model the run will build first, which preflight then does not look for; {flag: what to do} for
    each given path that does not exist, since nothing is built there)."""
    problems, mcfg = [], needed(cfg, mcfg)
    if cfg.train_split in scenes.SPLITS:  # the world's sizes are known without a file
        flag = "shapes_train_size" if cfg.train_split == "train" else "shapes_eval_size"
        try:
            check_one_batch(wcfg.size(cfg.train_split), cfg.batch_size, f"--{flag} {wcfg.size(cfg.train_split)}")
        except UsageError as e:
            problems.append(str(e))
    teacher = None if cfg.distill == "none" else cfg.teacher
    detector = None if mcfg.visual_init in NAMED_VISUAL_INITS else mcfg.visual_init
    given = {"text_encoder": mcfg.text_encoder, "teacher": teacher, "visual_init": detector}
    what = {"text_encoder": "vocabulary", "teacher": "toy CLIP", "visual_init": f"toy {_detector(mcfg)}"}
    building = {flag: f"the synthetic world's {what[flag]} will be built at {path}" for flag, path in given.items()
                if path in TOY_PATHS[flag] and not os.path.exists(path)}
    advice = {flag: how for flag, path in given.items() if path is not None
              for how in [not_built_here(flag, path, wcfg)] if how}
    try:  # toy models already built: with this run's settings?
        check_world_files(mcfg.text_encoder, *toy_configs(mcfg, wcfg, teacher))
    except UsageError as e:
        problems.append(str(e))
    return problems, building, advice


def needed(cfg, mcfg: ModelConfig) -> ModelConfig:
    """mcfg as far as the world's toy models go, for check_inputs and prepare alike (cfg: the TrainConfig): on
    --resume the checkpoint holds every weight and the visual branch starts at random, so no toy detector is built,
    or checked against the run's settings, for it."""
    return replace(mcfg, visual_init="random") if cfg.resume else mcfg


def not_built_here(flag: str, path: str, wcfg: WorldConfig) -> str | None:
    """For a path given to --text_encoder, --teacher or --visual_init (flag) on the synthetic world that does not
    exist: what to do instead, since prepare builds nothing there. None when it exists or is a recipe's."""
    if os.path.exists(path) or path in TOY_PATHS[flag]:
        return None
    return {"text_encoder": f"the synthetic world's vocabulary ships at {TOY_PATHS[flag][0]} (written there when "
                            f"missing); leave --text_encoder out to use it, or give a folder that holds a vocab.txt",
            "teacher": f"the toy CLIP ships at {TOY_PATHS['teacher'][0]} (built there when missing); to build one at "
                       f"{path} on purpose: python world/toy_clip.py --out_dir {path} --steps "
                       f"{wcfg.toy_teacher_steps} --imsize {ToyCLIPConfig.imsize} --shapes_image_size "
                       f"{wcfg.shapes_image_size}",
            "visual_init": f"the toy DETR and the toy Swin ship at {' and '.join(TOY_PATHS[flag])} (built there when "
                           f"missing); leave --visual_init out to use the one of your --backbone, or pass random or a "
                           f"checkpoint that exists"}[flag]


# -----------------------------------------------------------------------------
# the run's first step: build what is missing, then check what is there


def prepare(mcfg: ModelConfig, wcfg: WorldConfig, teacher: str | None, env: DeviceEnv) -> None:
    """Make what a shapes run loads but nobody can download, once, by rank 0; later runs reuse it: the world's BERT
    vocabulary, its toy CLIP teacher (teacher None: no distillation) and its toy DETR or toy Swin (visual_init a
    file path; the Swin for a QRNet student). Only at the recipes' own paths (TOY_PATHS): a typed path that does not
    exist is refused before the run (check_inputs' advice, in preflight), never built at."""
    wanted, detector = toy_configs(mcfg, wcfg, teacher)
    given = {"text_encoder": mcfg.text_encoder, "teacher": teacher,
             "visual_init": None if detector is None else detector.path}

    def build_here(flag: str) -> bool:
        return env.is_master and given[flag] is not None and not os.path.exists(given[flag]) and \
            given[flag] in TOY_PATHS[flag]

    if build_here("text_encoder"):
        print0(f"writing the synthetic world's vocabulary to {write_vocab(mcfg.text_encoder)}")
    if build_here("teacher"):
        print0(f"no CLIP teacher at {teacher}: training the synthetic world's toy CLIP first "
               f"(python world/toy_clip.py does the same)")
        build_toy_teacher(wanted)
    if build_here("visual_init"):
        print0(f"no visual branch at {detector.path}: pretraining the synthetic world's toy {_detector(mcfg)} first")
        build = build_toy_swin if isinstance(detector, ToySwinConfig) else build_toy_detr
        build(detector, mcfg, data.load_tokenizer(mcfg.text_encoder))
    if env.ddp:
        torch.distributed.barrier()
    check_world_files(mcfg.text_encoder, wanted, detector)


def _detector(mcfg: ModelConfig) -> str:
    return "Swin" if mcfg.backbone in qrnet.SWIN_SIZES else "DETR"


def toy_configs(mcfg: ModelConfig, wcfg: WorldConfig, teacher: str | None
                ) -> tuple[ToyCLIPConfig | None, ToyDETRConfig | ToySwinConfig | None]:
    """The toy CLIP and the toy detector a shapes run asks for (None: it uses none), as check_world_files compares
    them: a toy DETR for a TransVG student, a toy Swin for a QRNet one (--toy_detector_steps steps, either)."""
    # The toy CLIP is one model of the world, as CLIP is one model of the web: it learns on the canvas of the world's
    # recipe (ToyCLIPConfig.imsize, the TransVG student's 64 px), whatever the student's, and a student on another
    # canvas reaches it through CLIPTeacher's own resize to its input, as any student reaches CLIP
    wanted = None if teacher is None else ToyCLIPConfig(
        out_dir=teacher, steps=wcfg.toy_teacher_steps, shapes_image_size=wcfg.shapes_image_size)
    if mcfg.visual_init in NAMED_VISUAL_INITS:
        return wanted, None
    # either detector learns on the run's train scenes (their pictures only), which the run's data cache then shares
    common = dict(path=mcfg.visual_init, steps=wcfg.toy_detector_steps, shapes_image_size=wcfg.shapes_image_size,
                  train_size=wcfg.size("train"))
    if mcfg.backbone in qrnet.SWIN_SIZES:
        return wanted, ToySwinConfig(**common, model=swin_fields(mcfg))
    return wanted, ToyDETRConfig(**common, model={k: getattr(mcfg, k) for k in VISUAL_FIELDS})


def check_world_files(text_encoder: str, teacher: ToyCLIPConfig | None,
                      detector: ToyDETRConfig | ToySwinConfig | None = None) -> None:
    """Refuse a cached vocabulary, toy CLIP or toy detector (DETR or Swin) that was made by other code or settings
    than this run asks for, never reuse it silently. A CLIP folder without our metrics.json, or a checkpoint without
    our toy_config (the toy Swin's: in mmdet's 'meta'), is something someone supplied: it is used as given."""
    vocab = Path(text_encoder) / "vocab.txt"
    if vocab.exists() and not (Path(text_encoder) / "config.json").exists():  # a real BERT folder has one
        missing = sorted(set(scenes.WORDS) - set(vocab.read_text().split()))
        if missing:  # its missing words would all be [UNK]
            raise UsageError(f"{vocab} lacks words the synthetic world says ({', '.join(missing[:5])}); delete "
                             f"{text_encoder} to have it rewritten")
    record = None if teacher is None else Path(teacher.out_dir) / "metrics.json"
    if record is not None and record.exists():
        _same_settings(f"the toy CLIP at {teacher.out_dir}", json.loads(record.read_text()).get("config", {}),
                       teacher, "out_dir", "Delete the folder to rebuild it with this run's, or pass --teacher "
                       "<another folder>")
    if detector is not None and os.path.isfile(detector.path):
        ckpt = read_checkpoint(detector.path)
        swin = isinstance(detector, ToySwinConfig)  # its settings in mmdet's 'meta', the toy DETR's beside its 'model'
        built = (ckpt.get("meta") or {}).get("toy_config") if swin else ckpt.get("toy_config")
        if built is not None:
            _same_settings(f"the toy {'Swin' if swin else 'DETR'} {detector.path}", built, detector, "path",
                           "Delete it to rebuild it with this run's, or pass --visual_init <another path>")


def _same_settings(what: str, built: dict, wanted, skip: str, fix: str) -> None:
    diff = [f"{k} {built.get(k)!r} (this run: {v!r})" for k, v in asdict(wanted).items()
            if k != skip and built.get(k) != v]
    if diff:
        raise UsageError(f"{what} was built with other settings: {'; '.join(diff)}. {fix}")
