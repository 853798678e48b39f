"""Before a training run: every flag and input it needs, checked at once, before anything is built or written.

    to_build = check_inputs(cfg, dcfg, mcfg, wcfg, env)    # train.main; --dry_run stops after it

One UsageError lists every problem, with what to do for each (exit status 2): flags that contradict each other or this
machine (one flag's value is its config's to check), the split files and images, BERT and CLIP (on disk, in the Hugging
Face cache, or on the hub, asked once), the detector the visual branch starts from, the out_dir. On the synthetic
world, world/prepare.py answers for the inputs it builds itself.
"""

import contextlib
import os

import torch.distributed as dist
from transformers import BertConfig

import data
import qrnet
from annotations.transvg_splits import GET_SPLITS, read_split_file
from machinery import interop, run_folders
from machinery.flags import UsageError
from machinery.runtime import DeviceEnv, amp_dtype
from model import BUILT_IN_VISUAL_INITS, LOCATIONS, OFFICIAL_VISUAL_INITS, ModelConfig


def check_inputs(cfg, dcfg: data.DataConfig, mcfg: ModelConfig, wcfg, env: DeviceEnv) -> list[str]:
    """Everything that can be checked before anything is built, downloaded or written (cfg: the TrainConfig; wcfg:
    the synthetic world's settings, None on a benchmark): the flags against each other and this machine, every file
    and model the run will read, the out_dir. Raises one UsageError listing every problem, with what to do for each,
    on every rank (rank 0's list: it alone claims the out_dir). Returns what the run will build first (the synthetic
    world's toy models)."""
    problems, building, advice = [], {}, {}
    if wcfg is not None:  # the world's own inputs: what it builds first, what it cannot
        from world import prepare
        problems, building, advice = prepare.check_inputs(cfg, wcfg, mcfg)
    problems += flag_conflicts(cfg, dcfg, mcfg, env)
    problems += missing_models(cfg, mcfg, building, advice)
    if not cfg.resume:  # a resumed run takes every weight from its checkpoint
        if mcfg.visual_init in OFFICIAL_VISUAL_INITS:
            _check(problems, interop.official_visual_checkpoint, mcfg.visual_init, mcfg.backbone,
                   data.DATASETS[dcfg.dataset].detr, cfg.checkpoint_dir)
        elif mcfg.visual_init not in BUILT_IN_VISUAL_INITS and not os.path.isfile(mcfg.visual_init) and \
                "visual_init" not in building:
            problems.append(f"--visual_init {mcfg.visual_init}: no such file; " + advice.get(
                "visual_init", "give a DETR, TransVG, QRNet or Mask R-CNN checkpoint, or random (or imagenet for a "
                "ResNet)"))
    splits = {cfg.train_split, cfg.eval_split, *(data.DATASETS[dcfg.dataset].eval_splits if cfg.final_eval else ())}
    problems += missing_inputs(dcfg, [s for s in data.DATASETS[dcfg.dataset].splits if s in splits])
    if env.is_master:  # where it writes: rank 0 alone looks, as it alone will lock it
        _check(problems, run_folders.check_run_dir, cfg.out_dir, cfg.resume, cfg.overwrite)
    if env.ddp:
        shared = [problems]
        dist.broadcast_object_list(shared, src=0)
        problems = shared[0]
    if len(problems) == 1:
        raise UsageError(problems[0])
    if problems:
        raise UsageError(f"{len(problems)} problems, found before anything was built or written:\n" +
                         "\n".join(f"  - {p}" for p in problems) + "\nFix them and run again (--dry_run checks only).")
    return list(building.values())


def check_one_batch(n: int, batch_size: int, subject: str) -> None:
    """A training split of n samples holds at least one global batch; subject names where n comes from. Checked here
    for the synthetic world, whose sizes are known without a file, and by train.py once a benchmark's split is read."""
    if n < batch_size:
        raise UsageError(f"{subject}: fewer training samples than one batch (--batch_size {batch_size}); give at "
                         f"least {batch_size}, or a smaller --batch_size")


def _check(problems: list[str], fn, *args) -> None:
    """fn(*args), a check that raises UsageError: its message joins problems."""
    try:
        fn(*args)
    except UsageError as e:
        problems.append(str(e))


def flag_conflicts(cfg, dcfg: data.DataConfig, mcfg: ModelConfig, env: DeviceEnv) -> list[str]:
    """What the flags ask that contradicts another flag or this machine (cfg: the TrainConfig)."""
    problems = []
    if cfg.batch_size % (cfg.micro_batch * env.world_size):
        problems.append(f"--batch_size {cfg.batch_size}: must be a multiple of micro_batch x processes = "
                        f"{cfg.micro_batch} x {env.world_size}; change --batch_size or --micro_batch")
    _check(problems, amp_dtype, env.device, cfg.dtype)
    for flag in ("train_split", "eval_split"):
        _check(problems, data.check_split, dcfg.dataset, getattr(cfg, flag), f"--{flag}")
    if cfg.cache_visual:  # the cache holds one view of each sample through a branch that never changes
        distilled_image = cfg.distill != "none" and cfg.distill_modality != "text"
        for bad, why in ((cfg.augment, "expected false with --augment (the cache holds one unaugmented view)"),
                         (mcfg.backbone in qrnet.SWIN_SIZES, "QRNet's visual branch depends on the expression, so "
                                                             "it cannot be cached"),
                         (distilled_image and LOCATIONS[cfg.distill_loc].in_visual_branch,
                          f"--distill_loc {cfg.distill_loc} reads its image feature inside the frozen visual branch, "
                          f"which cannot learn from it; use loc1 or loc2, --distill_modality text, or "
                          f"--cache_visual false")):
            if bad:
                problems.append(f"--cache_visual: {why}")
    return problems


def missing_models(cfg, mcfg: ModelConfig, building: dict[str, str], advice: dict[str, str]) -> list[str]:
    """The BERT and CLIP the run loads that are not on disk, in the cache or on the hub, and a --max_query_len longer
    than BERT's position table; building: the world's toy models the run will build first; advice: what to do instead
    for a world's path."""
    problems = []
    if cfg.resume and cfg.teacher_trainable and cfg.distill != "none" and not os.path.isfile(cfg.resume + ".teacher"):
        problems.append(f"--resume {cfg.resume}: the trained teacher beside it ({cfg.resume}.teacher) is missing; "
                        f"copy it there with the checkpoint")
    models = [("text_encoder", mcfg.text_encoder, ["vocab.txt"] + ["config.json"] * (mcfg.text_init == "pretrained"))]
    if cfg.distill != "none":
        models.append(("teacher", cfg.teacher, ["config.json"]))
    for flag, name, needed in models:
        why = None if flag in building else next((w for w in (find_pretrained(name, f) for f in needed) if w), None)
        if why:
            how = (f"where the hub is reachable, `hf download {name}` fills the cache (copy it, and point HF_HOME at "
                   f"the copy), or save_pretrained it into a folder and pass that (README)" +
                   (f"; if it is a path: {advice[flag]}" if flag in advice else "") if is_hub_name(name) else
                   advice.get(flag) or f"give a folder that holds {' and '.join(needed)} (or a hub name)")
            problems.append(f"--{flag} {name}: {why}; {how}")
    positions = None  # BERT's position table: the random one's from its config, a pretrained one's config.json
    if mcfg.text_init == "random" and mcfg.text_config is not None:
        positions = mcfg.text_config.get("max_position_embeddings", BertConfig().max_position_embeddings)
    elif mcfg.text_init == "pretrained" and not any(p.startswith(f"--text_encoder {mcfg.text_encoder}:")
                                                    for p in problems):
        with contextlib.suppress(OSError):  # on disk or in the cache, read without the hub
            positions = BertConfig.from_pretrained(mcfg.text_encoder, local_files_only=True).max_position_embeddings
    if positions is not None and mcfg.max_query_len > positions:
        problems.append(f"--max_query_len {mcfg.max_query_len} is more than the text encoder {mcfg.text_encoder!r} "
                        f"holds: its position table has {positions} rows")
    return problems


def missing_inputs(cfg: data.DataConfig, splits) -> list[str]:
    """What a run on these splits of cfg.dataset would not find, each with the flag that says where and what to
    do (the README's download steps): split files, then the image folder. Reads nothing, except, when the image
    folder is missing, the first split file's first entry (split files may name images by absolute paths).
    check_inputs and evaluate.py ask before they build anything."""
    if cfg.dataset == "shapes":
        return []
    info = data.DATASETS[cfg.dataset]
    paths = list(dict.fromkeys(p for split in splits for p in data.split_paths(cfg.dataset, split, cfg.split_root)))
    found, problems = [p for p in paths if os.path.isfile(p)], []
    if len(found) < len(paths):
        problems.append(f"--split_root {cfg.split_root}: {', '.join(p for p in paths if p not in found)} not found. "
                        f"{GET_SPLITS} into {cfg.split_root}/ (so that "
                        f"{os.path.join(cfg.split_root, info.folder)}/ exists), or pass --split_root")
    image_dir = os.path.join(cfg.data_root, info.image_dir)
    if not os.path.isdir(image_dir):
        try:
            first = read_split_file(found[0])[0][0] if found else ""
        except (UsageError, IndexError, TypeError, KeyError):  # a broken file: its own error comes when it is read
            first = ""
        if not os.path.isabs(str(first)):
            problems.append(f"--data_root {cfg.data_root}: image folder {image_dir} not found: put the "
                            f"{info.images_from} there, or pass --data_root")
    return problems


# -----------------------------------------------------------------------------
# models by name: on disk, in the Hugging Face cache, or on the hub


def is_hub_name(name: str) -> bool:
    """A Hugging Face hub name (bert-base-uncased, openai/clip-vit-base-patch16) rather than a path, if nothing is
    there on disk; transformers decides so too."""
    return not os.path.exists(name) and not (os.path.isabs(name) or name.startswith(".") or name.count("/") > 1)


def find_pretrained(name: str, filename: str = "config.json", hub_timeout: float = 5.0) -> str | None:
    """Why transformers could not load the model `name` (a local folder, or a hub name), or None if it can: a folder
    must hold `filename`; a hub name is looked up in the local Hugging Face cache first, then asked of the hub once,
    with a short timeout (transformers itself retries for about a minute before it gives up)."""
    if os.path.isdir(name):
        return None if os.path.isfile(os.path.join(name, filename)) else f"the folder {name} holds no {filename}"
    if not is_hub_name(name):
        return f"no folder {name}"
    import huggingface_hub  # imported here: importing preflight.py stays cheap
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
    if isinstance(huggingface_hub.try_to_load_from_cache(name, filename), str):
        return None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "not in the local Hugging Face cache, and the hub is off (HF_HUB_OFFLINE)"
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(name, filename), timeout=hub_timeout)
    except EntryNotFoundError:
        return f"the hub's {name} has no {filename}"
    except RepositoryNotFoundError:
        return "no such model on the Hugging Face hub (or it is private: log in with `hf auth login`)"
    except Exception as e:  # no network, proxy, timeout: whatever it is, the hub could not be reached
        return f"not in the local Hugging Face cache and the hub could not be reached ({type(e).__name__})"
    return None
