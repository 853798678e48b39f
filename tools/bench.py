"""Benchmarks: each section prints its numbers, the machine and the setting.

    python tools/bench.py                                   # model: train step and forward, CPU fp32, batch 2
    python tools/bench.py --device cuda --dtype bfloat16 --batch_size 8 --compile --channels_last
    python tools/bench.py --teacher                         # + the CLIP teacher: its share of the train step
    python tools/bench.py --backbone swin_s_qrnet --teacher # the QRNet student (Swin-S, QD-ATT, neck), not TransVG
    python tools/bench.py --backbone swin_toy_qrnet         # the synthetic world's QRNet step, and where it goes
    python tools/bench.py --data                            # data pipeline: images/s per core, train and eval

Model: the paper's ResNet-50 + DETR encoder (or --backbone swin_s_qrnet: QRNet's Swin-S, QD-ATT and neck), BERT-base,
6-layer fusion, 640x640, 20 tokens, random weights (speed does not depend on them). A train step is forward + eq. 8 +
backward + AdamW; --teacher adds the frozen teacher (ViT-B/16's shape, random, unless --teacher_name is a folder of real
weights) and the distillation loss, as train.py does. Prints ms/step, images/s, peak memory and, on CUDA, the model
FLOPs utilisation. --backbone swin_toy_qrnet times the synthetic world's QRNet student as train.py builds it, and
--breakdown says where its step goes (each part's forward + backward timed alone on the inputs it had in a real step).

Data: images/s of the train and eval __getitem__ (read, decode, transforms, tokenizer), one thread, on COCO-sized JPEGs
in RefCOCO's split format; --split_root and --tokenizer (bert-base-uncased's) time given files, e.g. the official's.
"""

import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

if __package__ in (None, ""):  # run as a file (python tools/bench.py): the project's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import qrnet  # noqa: E402
from clip_teacher import DEFAULT_TEACHER, CLIPTeacher  # noqa: E402
from losses import distill_loss, total_loss  # noqa: E402
from machinery.flags import check_fields, cli, parse_config  # noqa: E402
from machinery.recipes import recipe  # noqa: E402
from machinery.runtime import DTYPE_NAMES, amp_dtype, autocast_for, device_rule, setup_device  # noqa: E402
from model import GroundingModel, ModelConfig, example_inputs, resolve_text_config  # noqa: E402
from world import scenes, toy_clip  # noqa: E402
from world.dataset import write_vocab  # noqa: E402

# bert-base-uncased's architecture, so the benchmark needs no download
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from NVIDIA's data sheets


# -----------------------------------------------------------------------------
# model


def timed(fn, warmup: int, reps: int, device: torch.device) -> float:
    """Median seconds per call of fn after warmup calls."""
    times = []
    for i in range(warmup + reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux: process peak RSS


TOY_BACKBONES = ("swin_toy_qrnet",)  # benchmarked as the synthetic world's student (the toy TransVG's step runs on
# cached tokens: train.py's log gives its time)


def bench_model_config(backbone: str) -> ModelConfig:
    """The paper's model with this backbone (BERT-base, 640 px), or a toy backbone's synthetic-world student as
    train.py builds it from its recipe (random weights: speed does not depend on them)."""
    if backbone not in TOY_BACKBONES:
        return ModelConfig(backbone=backbone, text_init="random", text_config=BERT_BASE)
    toy = recipe({"dataset": "shapes", "backbone": backbone})[1]  # the synthetic world's recipe, as train.py runs it
    fields = {k: v for k, v in toy.items() if k in ModelConfig.__dataclass_fields__}
    mcfg = ModelConfig(**{**fields, "backbone": backbone, "visual_init": "random"})
    return resolve_text_config(mcfg, len(scenes.WORDS) + 5)  # the world's words, [PAD] [UNK] [CLS] [SEP] [MASK]


def bench_model(cfg: "BenchConfig", device: torch.device) -> dict:
    mcfg = bench_model_config(cfg.backbone)
    torch.manual_seed(0)
    model = GroundingModel(mcfg).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device.type == "cuda")
    inputs = {k: v.to(device) for k, v in example_inputs(mcfg, cfg.batch_size).items()}
    if cfg.channels_last:
        inputs["images"] = inputs["images"].contiguous(memory_format=torch.channels_last)
    target = (torch.rand(cfg.batch_size, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25).to(device)
    amp = amp_dtype(device, cfg.dtype)  # refuses bf16/fp16 off CUDA, with a message
    toy_world = cfg.backbone in TOY_BACKBONES
    teacher = build_teacher(cfg.teacher_name, device, toy_world) if cfg.teacher else None
    texts = (["the small red circle on the left", "the triangle above the green square"] if toy_world else
             ["man in red shirt on the left", "the second dog from right"]) * cfg.batch_size
    rgb = data.unnormalise(inputs["images"])

    def teacher_targets():
        return teacher.targets(rgb, texts[:cfg.batch_size], model.distill_widths("loc1"))

    def train_step():
        targets = teacher_targets() if teacher is not None else None
        with autocast_for(device, cfg.dtype):
            out = step_model(**inputs)
        terms = distill_loss(out["distill"]["loc1"], targets) if targets is not None else {}
        loss, _ = total_loss(out["pred_boxes"], target, distill_terms=terms)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def forward():
        with autocast_for(device, cfg.dtype):
            step_model(**inputs)

    model.train()
    results = {"train_s": timed(train_step, cfg.warmup, cfg.reps, device)}
    if teacher is not None:
        results["teacher_s"] = timed(teacher_targets, cfg.warmup, cfg.reps, device)
    if cfg.breakdown:
        results["parts_s"] = step_breakdown(model, inputs, cfg.warmup, cfg.reps, device)
        if teacher is not None:
            results["parts_s"]["teacher (no gradient)"] = results["teacher_s"]
        for p in model.parameters():  # every gradient present, as after a step's backward
            p.grad = torch.zeros_like(p)
        results["parts_s"]["AdamW update"] = timed(optimizer.step, cfg.warmup, cfg.reps, device)
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    results["forward_s"] = timed(forward, cfg.warmup, cfg.reps, device)
    results["peak_mem_gb"] = peak_memory_gb(device)
    if device.type == "cuda":
        model.train()
        results.update(flop_utilisation(train_step, results["train_s"], device, amp))
    return results


def flop_utilisation(train_step, seconds: float, device: torch.device, amp: torch.dtype | None) -> dict:
    """TFLOPs of one train step (torch.utils.flop_counter) and, in bf16 on a GPU whose peak we know, the model FLOPs
    utilisation at `seconds` a step."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        train_step()
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    flops = counter.get_total_flops()
    return {"tflops_per_step": flops / 1e12, **({"mfu": flops / seconds / (peak * 1e12)}
                                                if peak and amp == torch.bfloat16 else {})}


def model_parts(model: GroundingModel) -> dict[str, list[torch.nn.Module]]:
    """A QRNet student's parts as the breakdown names them, each the modules a forward calls for it. The neck's
    module includes its QD-ATT, which step_breakdown takes out of it."""
    v = model.visual
    return {"Swin (blocks, patch embedding and merging, stage norms)": [v.patch_embed, *v.stages, *v.merges,
                                                                        *v.stage_norms],
            "QD-ATT (after each stage and in the neck)": [*v.qdatt, *v.neck.qdatt],
            "neck (lateral convs, top-down and bottom-up sums)": [v.neck],
            "fusion (+ BERT, projections, box head)": [model.text_encoder, model.visual_proj, model.text_proj,
                                                       model.fusion, model.bbox_head]}


def step_breakdown(model: GroundingModel, inputs: dict, warmup: int, reps: int, device: torch.device
                   ) -> dict[str, float]:
    """Seconds per train step in each of model_parts: each module's forward + backward timed alone, on copies of
    the inputs it had in a real forward (with a gradient where those had one), the backward from the mean square of
    its outputs (its cost does not depend on the values). The loss and autograd's work between the parts are left
    out: the caller's whole step minus these is what they cost."""
    calls = {}  # module -> (args, kwargs) of its first call

    def capture(module, args, kwargs) -> None:
        calls.setdefault(module, (args, kwargs))
    parts = model_parts(model)
    hooks = [m.register_forward_pre_hook(capture, with_kwargs=True) for ms in parts.values() for m in ms]
    model.train()
    model(**inputs)  # with autograd on: which inputs carry a gradient is what the copies keep
    for h in hooks:
        h.remove()

    def fresh(x):
        if isinstance(x, (list, tuple)):
            return type(x)(fresh(y) for y in x)
        return x.detach().clone().requires_grad_(x.requires_grad) if torch.is_tensor(x) else x

    def seconds(module) -> float:
        args, kwargs = fresh(calls[module][0]), {k: fresh(v) for k, v in calls[module][1].items()}

        def forward_backward() -> None:
            out = module(*args, **kwargs)
            out = getattr(out, "last_hidden_state", out)  # BERT's output
            sum(t.float().square().mean() for t in (out if isinstance(out, (list, tuple)) else [out])).backward()
        return timed(forward_backward, warmup, reps, device)

    times = {name: sum(seconds(m) for m in ms) for name, ms in parts.items()}
    times["neck (lateral convs, top-down and bottom-up sums)"] -= sum(seconds(m) for m in model.visual.neck.qdatt)
    model.zero_grad(set_to_none=True)
    return times


def build_teacher(name: str, device: torch.device, toy_world: bool = False) -> CLIPTeacher:
    """The teacher as train.py builds it; a hub name or path we cannot load becomes a random model of its shape (on
    the synthetic world: the toy CLIP's)."""
    if os.path.isdir(name):
        return CLIPTeacher(name, device=device)
    with tempfile.TemporaryDirectory(prefix="bench_clip_") as directory:  # ~600 MB of random weights
        if toy_world:
            toy_clip.save_toy_clip(directory, toy_clip.ToyCLIPConfig(), list(scenes.WORDS))
            return CLIPTeacher(directory, device=device)
        patch = 16 if "patch16" in name else 14 if "patch14" in name else 32
        if "large" in name:  # ViT-L/14: 1024-wide vision, 768-wide text, 768-d embeddings
            toy_clip.save_random_clip(directory, BENCH_WORDS, projection_dim=768,
                             vision=dict(patch_size=patch, hidden_size=1024, intermediate_size=4096,
                                         num_hidden_layers=24, num_attention_heads=16),
                             text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12))
        else:
            toy_clip.save_random_clip(directory, BENCH_WORDS, vision=dict(patch_size=patch))
        return CLIPTeacher(directory, device=device)


BENCH_WORDS = "man in red shirt on the left second dog from right".split()


# -----------------------------------------------------------------------------
# data

BENCH_SIZES = ((640, 480), (480, 640), (500, 375))  # (W, H): the common COCO shapes
_OBJECTS = ("man", "woman", "dog", "car", "bus", "chair", "cup", "horse", "zebra", "table", "kid", "bear")
_WORDS = ("red", "white", "small", "big", "striped", "wooden", "tall", "brown")
_TAILS = ("on the left", "on the right", "top", "in the middle", "left of the car", "holding a cup",
          "near the window", "sitting down", "in the back", "closest to the camera")


def make_bench_split(root: str, n: int = 64, seed: int = 0) -> str:
    """Write n photo-like JPEGs (smooth noise, gradients, blocks, grain; quality 90) cycling through
    BENCH_SIZES, and RefCOCO-format train/val split files (COCO xywh boxes; 40% of the phrases have a
    position word, which rules out the crop). Returns the split root."""
    import torch.nn.functional as F
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.join(root, "jpegs"), exist_ok=True)
    entries = []
    for i in range(n):
        w, h = BENCH_SIZES[i % len(BENCH_SIZES)]
        img = torch.linspace(0, 1, h).view(1, h, 1) * torch.rand(3, 1, 1, generator=g) * 160 + 40
        for cell, amp in ((40, 90), (12, 40)):  # two octaves of smooth noise
            low = torch.rand(1, 3, h // cell + 2, w // cell + 2, generator=g) - 0.5
            img = img + amp * F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
        for _ in range(6):
            x, y = (int(torch.randint(0, side - 60, (), generator=g)) for side in (w, h))
            img[:, y:y + 50 + i % 90, x:x + 40 + i % 120] = torch.rand(3, 1, 1, generator=g) * 255
        img = (img + 5 * torch.randn(3, h, w, generator=g)).clamp(0, 255).to(torch.uint8)
        path = os.path.join(root, "jpegs", f"bench_{i:03d}.jpg")
        with open(path, "wb") as f:
            f.write(encode_jpeg(img, quality=90).numpy().tobytes())
        bw, bh = ((0.1 + 0.5 * float(torch.rand((), generator=g))) * s for s in (w, h))
        bx, by = float(torch.rand((), generator=g)) * (w - bw), float(torch.rand((), generator=g)) * (h - bh)
        phrase = f"{_WORDS[i % len(_WORDS)]} {_OBJECTS[i % len(_OBJECTS)]}"
        if i % 5 < 3:
            phrase += " " + _TAILS[i % len(_TAILS)]
        entries.append((path, i, [round(bx, 2), round(by, 2), round(bw, 2), round(bh, 2)], phrase, []))
    split_root = os.path.join(root, "splits")
    os.makedirs(os.path.join(split_root, "unc"), exist_ok=True)
    for split in ("train", "val"):  # absolute image paths: data_root does not matter
        torch.save(entries, os.path.join(split_root, "unc", f"unc_{split}.pth"))
    return split_root


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _images_per_s(ds, passes: int) -> list[float]:
    """ds[i] for every i, `passes` times (seeded), after a warm-up; images/s of each pass."""
    for i in range(min(4, len(ds))):  # warm-up: the first calls load libraries and fill caches
        ds[i]
    rates = []
    for p in range(passes):
        torch.manual_seed(p)
        t0 = time.perf_counter()
        for i in range(len(ds)):
            ds[i]
        rates.append(len(ds) / (time.perf_counter() - t0))
    return rates


def bench_data(split_root: str | None = None, data_root: str = "ln_data", tokenizer: str | None = None,
               passes: int = 3, imsize: int = 640, n: int = 64) -> dict:
    """Median images/s of make_dataset("refcoco", ...)[i] over every i: the train transform on the
    train split, the eval transform on the val split; one thread (restored afterwards)."""
    threads, tmp = torch.get_num_threads(), tempfile.TemporaryDirectory()
    torch.set_num_threads(1)
    try:
        if split_root is None:
            split_root = make_bench_split(tmp.name, n=n)
            print(f"generated {n} JPEGs and split files in {tmp.name}")
        if tokenizer is None:
            print("note: no --tokenizer, so a word-level vocab of the phrases (costs about what BERT's does)")
            entries = torch.load(os.path.join(split_root, "unc", "unc_train.pth"), weights_only=True)
            write_vocab(tmp.name, sorted({w for e in entries for w in e[3].lower().replace(",", " ").split()}))
            tok = data.load_tokenizer(tmp.name)
        else:
            tok = data.load_tokenizer(tokenizer)
        results = {"cpu": _cpu_name(), "threads": 1, "imsize": imsize, "torch": torch.__version__}
        for key, split in (("train", "train"), ("eval", "val")):
            ds = data.make_dataset(data.DataConfig("refcoco", split_root=split_root, data_root=data_root), split, tok,
                                   train=key == "train", imsize=imsize)
            rates = _images_per_s(ds, passes)
            results[key] = statistics.median(rates)
            print(f"[{key}] {len(ds)} images, passes " + " ".join(f"{r:.1f}" for r in rates) +
                  f" img/s -> median {results[key]:.1f} img/s ({1e3 / results[key]:.2f} ms/img)", flush=True)
        print(f"SUMMARY data pipeline (1 process, 1 thread, read + decode + transform + tokenize) on "
              f"{results['cpu']}: train {results['train']:.1f} img/s | eval {results['eval']:.1f} img/s")
        return results
    finally:
        torch.set_num_threads(threads)
        tmp.cleanup()


# -----------------------------------------------------------------------------
# command line


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_name()}, {torch.get_num_threads()} threads"


@dataclass
class BenchConfig:
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
    dtype: str = "float32"  # float32, or bfloat16 / float16 autocast (CUDA only); fp32, bf16, fp16 also accepted
    batch_size: int = 2  # images per step
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # channels_last memory format for the ResNet
    backbone: str = "resnet50"  # resnet50, resnet101 (TransVG), swin_s_qrnet (QRNet), swin_toy_qrnet (the world's)
    breakdown: bool = False  # a QRNet student: also time each part of the train step (Swin, QD-ATT, neck, fusion)
    teacher: bool = False  # add the CLIP teacher to the train step and time its share
    teacher_name: str = DEFAULT_TEACHER  # real CLIP weights (a folder), or a hub name: its shape, random
    warmup: int = 1  # untimed calls first
    reps: int = 3  # timed calls; the median is printed
    threads: int = 0  # CPU threads (0 = torch's default)
    data: bool = False  # time the data pipeline instead of the model
    split_root: str = ""  # --data: folder holding unc/unc_{train,val}.pth (default: generate them)
    data_root: str = "ln_data"  # --data: image root for relative paths in the split files
    tokenizer: str = ""  # --data: BERT hub name or folder with vocab.txt (default: a word vocab of the phrases)
    imsize: int = 640  # --data: canvas side
    passes: int = 3  # --data: timed passes over the images; prints the median
    n: int = 64  # --data: images to generate when --split_root is not given

    CHOICES = {"dtype": DTYPE_NAMES}

    def __post_init__(self) -> None:
        check_fields(self, [device_rule(self.device),
                            ("breakdown", not self.breakdown or self.backbone in qrnet.SWIN_SIZES,
                             "false unless --backbone is a QRNet student's (its parts are QRNet's)")])


def toy_defaults(flags: dict) -> tuple[str, dict, list]:
    """For parse_config: a toy backbone's defaults are its synthetic-world recipe's batch and teacher, and the
    breakdown."""
    if flags["backbone"] not in TOY_BACKBONES:
        return "", {}, []
    toy = recipe({"dataset": "shapes", "backbone": flags["backbone"]})[1]
    return f"synthetic world's {flags['backbone']}", {"batch_size": toy["batch_size"], "teacher": True,
                                                       "teacher_name": toy["teacher"], "breakdown": True}, []


def main(argv: list[str] | None = None) -> dict:
    transformers.utils.logging.disable_progress_bar()
    cfg, = parse_config(argv, [BenchConfig], toy_defaults, description=__doc__)
    if cfg.data:
        return {"data": bench_data(cfg.split_root or None, cfg.data_root, cfg.tokenizer or None, cfg.passes,
                                   cfg.imsize, cfg.n)}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = setup_device(cfg.device).device
    amp_dtype(device, cfg.dtype)  # --dtype bfloat16 on a CPU: refused before the model is built
    r = bench_model(cfg, device)
    B = cfg.batch_size
    print(f"machine: {machine(device)} | torch {torch.__version__} | {cfg.backbone}, batch {B}, {cfg.dtype}"
          f"{', compile' if cfg.compile else ''}{', channels_last' if cfg.channels_last else ''}")
    print(f"train step : {r['train_s'] * 1e3:9.1f} ms/step  {B / r['train_s']:8.2f} images/s")
    print(f"forward    : {r['forward_s'] * 1e3:9.1f} ms/step  {B / r['forward_s']:8.2f} images/s")
    if "teacher_s" in r:
        print(f"teacher    : {r['teacher_s'] * 1e3:9.1f} ms/step  = {r['teacher_s'] / r['train_s']:.1%} of the train step")
    if "parts_s" in r:
        print("where the train step goes (each part's forward + backward timed alone, on the inputs it had in a step):")
        rest = r["train_s"] - sum(r["parts_s"].values())
        for part, seconds in {**r["parts_s"], "the rest (loss, autograd between the parts; < 0: noise)": rest}.items():
            print(f"  {part:<56}: {seconds * 1e3:8.1f} ms  {seconds / r['train_s']:6.1%}")
    print(f"peak memory: {r['peak_mem_gb']:.2f} GB ({'allocated on the GPU' if device.type == 'cuda' else 'process RSS'})")
    if "tflops_per_step" in r:
        print(f"FLOPs      : {r['tflops_per_step']:.2f} TFLOP/step" + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    return r


if __name__ == "__main__":
    cli(main)
