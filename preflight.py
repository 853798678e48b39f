"""Before a training run: every flag and input it needs, checked at once, before anything is built or written.

    to_build = check_inputs(cfg, dcfg, mcfg, env)    # train.main; --dry_run stops after it

A mistake found here is one UsageError listing every problem with what to do for each (exit status 2, no traceback):
flags that contradict each other or this machine, the split files and images, BERT and CLIP (local folders on disk,
hub names in the local Hugging Face cache, the hub asked once, with a short timeout), the detector checkpoint the
visual branch starts from, the checkpoint to resume, the out_dir. On the synthetic world, world.py answers for the
inputs it builds itself.
"""

import contextlib
import os

import torch.distributed as dist
from transformers import BertConfig

import data
import files
import interop
import qrnet
import world
from flags import UsageError
from model import BUILT_IN_VISUAL_INITS, OFFICIAL_VISUAL_INITS, ModelConfig, check_text_length
from runtime import DeviceEnv, amp_dtype


def check_inputs(cfg, dcfg: data.DataConfig, mcfg: ModelConfig, env: DeviceEnv) -> list[str]:
    """Everything that can be checked before anything is built, downloaded or written (cfg: the TrainConfig): the
    flags against each other and this machine, the checkpoint to resume, every file and model the run will read and
    the out_dir. Raises one UsageError listing every problem, with what to do for each, on every rank (rank 0's list:
    it alone claims the out_dir). Returns what the run will build first (the synthetic world's toy models)."""
    problems, building, advice = [], {}, {}

    def check(fn, *args) -> None:  # a function that raises UsageError: its message joins the list
        try:
            fn(*args)
        except UsageError as e:
            problems.append(str(e))

    if dcfg.dataset == "shapes":  # the world's own inputs: what it builds first, what it cannot (world.py)
        problems, building, advice = world.check_inputs(cfg, dcfg, mcfg)
    # flags against each other and this machine (the device itself: runtime.setup_device)
    per_step = cfg.micro_batch * env.world_size
    if cfg.batch_size % per_step:
        problems.append(f"--batch_size {cfg.batch_size}: must be a multiple of micro_batch x processes = "
                        f"{cfg.micro_batch} x {env.world_size}; change --batch_size or --micro_batch")
    check(amp_dtype, env.device, cfg.dtype)
    if cfg.cache_visual and mcfg.backbone in qrnet.SWIN_SIZES:
        problems.append("--cache_visual: QRNet's visual branch depends on the expression, so it cannot be cached")
    for flag in ("train_split", "eval_split"):
        if getattr(cfg, flag) not in data.DATASETS[dcfg.dataset].splits:
            problems.append(f"--{flag} {getattr(cfg, flag)}: {dcfg.dataset} has no such split; valid: "
                            f"{', '.join(data.DATASETS[dcfg.dataset].splits)}")
    if mcfg.text_init == "random" and mcfg.text_config is not None:  # a pretrained BERT's: read with it, below
        check(check_text_length, mcfg, mcfg.text_config.get("max_position_embeddings", 512))  # BERT's 512

    # what the run reads: every missing one, each with what to do (the README's download steps)
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
    if mcfg.text_init == "pretrained" and not any(f"--text_encoder {mcfg.text_encoder}:" in p for p in problems):
        with contextlib.suppress(OSError):  # on disk or in the cache: its position table, read without the hub
            bert = BertConfig.from_pretrained(mcfg.text_encoder, local_files_only=True)
            check(check_text_length, mcfg, bert.max_position_embeddings)
    if not cfg.resume:  # a resumed run takes every weight from its checkpoint
        if mcfg.visual_init in OFFICIAL_VISUAL_INITS:
            check(interop.official_visual_checkpoint, mcfg.visual_init, mcfg.backbone,
                  data.DATASETS[dcfg.dataset].detr, cfg.checkpoint_dir)
        elif mcfg.visual_init not in BUILT_IN_VISUAL_INITS and not os.path.isfile(mcfg.visual_init) and \
                "visual_init" not in building:
            problems.append(f"--visual_init {mcfg.visual_init}: no such file; " + advice.get(
                "visual_init", "give a DETR, TransVG, QRNet or Mask R-CNN checkpoint, or random (or imagenet for a "
                "ResNet)"))
    splits = {cfg.train_split, cfg.eval_split, *(data.DATASETS[dcfg.dataset].eval_splits if cfg.final_eval else ())}
    problems += data.missing_inputs(dcfg, [s for s in data.DATASETS[dcfg.dataset].splits if s in splits])
    if env.is_master:  # where it writes: rank 0 alone looks, as it alone will lock it
        check(files.check_run_dir, cfg.out_dir, cfg.resume, cfg.overwrite)
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
