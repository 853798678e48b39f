"""Speed and memory of the full-size model, and the CLIP teacher's share of a training step.

    python bench.py                                   # CPU, fp32, batch 2: train step and forward
    python bench.py --device cuda --dtype bf16 --batch_size 8 --compile --channels_last
    python bench.py --teacher                         # + the CLIP teacher: its share of the train step

The model is the paper's: ResNet-50 + DETR encoder, BERT-base, 6-layer fusion, 640x640 canvas, 20 tokens, random
weights (speed does not depend on them). A train step is forward + eq. 8 loss + backward + AdamW step; with
--teacher it also runs the frozen teacher (ViT-B/16 shape, random weights, unless --teacher_name is a directory of
real weights) on the same canvas and expressions, and adds the distillation loss, as train.py does.
Prints ms/step, images/s, peak memory and, on CUDA, model FLOPs utilisation (FLOPs counted by
torch.utils.flop_counter on one step, divided by the GPU's dense bf16 peak).
"""

import argparse
import contextlib
import os
import platform
import resource
import statistics
import tempfile
import time

import torch
import transformers
from transformers import CLIPConfig, CLIPModel

from clip_teacher import CLIPTeacher, save_word_tokenizer
from losses import distill_loss, total_loss
from model import GroundingModel, ModelConfig

# bert-base-uncased's architecture, so the benchmark needs no download
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, from NVIDIA's data sheets


def fake_batch(cfg: ModelConfig, batch_size: int, device: torch.device) -> dict:
    """Random inputs in the model's format; every other image has its bottom quarter padded."""
    g = torch.Generator().manual_seed(0)
    S, L = cfg.imsize, cfg.max_query_len
    img_is_pad = torch.zeros(batch_size, S, S, dtype=torch.bool)
    img_is_pad[::2, S * 3 // 4:] = True
    attention_mask = torch.ones(batch_size, L, dtype=torch.long)
    attention_mask[:, 12:] = 0
    batch = dict(images=torch.randn(batch_size, 3, S, S, generator=g), img_is_pad=img_is_pad,
                 input_ids=torch.randint(1000, 30000, (batch_size, L), generator=g) * attention_mask,
                 attention_mask=attention_mask, target=torch.rand(batch_size, 4, generator=g) * 0.5 + 0.25)
    return {k: v.to(device) for k, v in batch.items()}


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


def bench_model(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cfg = ModelConfig(backbone=args.backbone, text_init="random", text_config=BERT_BASE)
    torch.manual_seed(0)
    model = GroundingModel(cfg).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device.type == "cuda")
    batch = fake_batch(cfg, args.batch_size, device)
    if args.channels_last:
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    use_bf16 = args.dtype == "bf16"
    if use_bf16 and device.type != "cuda":
        raise SystemExit("--dtype bf16 is for CUDA only (bf16 autocast is off on CPU by design)")
    autocast = torch.autocast("cuda", torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    teacher = build_teacher(args.teacher_name, device) if args.teacher else None
    texts = ["man in red shirt on the left", "the second dog from right"] * args.batch_size

    def teacher_targets():
        return teacher.targets(batch["images"], texts[:args.batch_size], model.distill_widths("loc1"))

    def train_step():
        targets = teacher_targets() if teacher is not None else None
        with autocast:
            out = step_model(batch["images"], batch["img_is_pad"], batch["input_ids"], batch["attention_mask"])
        terms = distill_loss(out["distill"]["loc1"], targets) if targets is not None else {}
        loss, _ = total_loss(out["pred_boxes"], batch["target"], distill_terms=terms)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def forward():
        with autocast:
            step_model(batch["images"], batch["img_is_pad"], batch["input_ids"], batch["attention_mask"])

    model.train()
    results = {"train_s": timed(train_step, args.warmup, args.reps, device)}
    if teacher is not None:
        results["teacher_s"] = timed(teacher_targets, args.warmup, args.reps, device)
    model.eval()
    results["forward_s"] = timed(forward, args.warmup, args.reps, device)
    results["peak_mem_gb"] = peak_memory_gb(device)
    if device.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode
        model.train()
        with FlopCounterMode(display=False) as counter:
            train_step()
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        flops = counter.get_total_flops()
        results["tflops_per_step"] = flops / 1e12
        if peak and use_bf16:
            results["mfu"] = flops / results["train_s"] / (peak * 1e12)
    return results


def build_teacher(name: str, device: torch.device) -> CLIPTeacher:
    """The teacher as train.py builds it; a hub name we cannot download becomes a random model of its shape."""
    if os.path.isdir(name):
        return CLIPTeacher(name, device=device)
    with tempfile.TemporaryDirectory(prefix="bench_clip_") as directory:  # ~600 MB of random weights
        return random_teacher(name, directory, device)


def random_teacher(name: str, directory: str, device: torch.device) -> CLIPTeacher:
    tokenizer = save_word_tokenizer(directory, "man in red shirt on the left second dog from right".split())
    patch = 16 if "patch16" in name else 14 if "patch14" in name else 32
    wide = "large" in name  # ViT-L/14: 1024-wide vision, 768-wide text, 768-d embeddings
    vision = dict(patch_size=patch, **(dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                             num_attention_heads=16) if wide else {}))
    text = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **(dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12) if wide else {}))
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768 if wide else 512)
              ).save_pretrained(directory)
    return CLIPTeacher(directory, device=device)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast, CUDA only")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--channels_last", action="store_true")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--teacher", action="store_true", help="add the CLIP teacher to the train step")
    ap.add_argument("--teacher_name", default="openai/clip-vit-base-patch16",
                    help="a directory of real CLIP weights, or a hub name whose shape is built with random weights")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    r = bench_model(args)
    B = args.batch_size
    print(f"machine: {machine(device)} | torch {torch.__version__} | {args.backbone}, batch {B}, {args.dtype}"
          f"{', compile' if args.compile else ''}{', channels_last' if args.channels_last else ''}")
    print(f"train step : {r['train_s'] * 1e3:9.1f} ms/step  {B / r['train_s']:8.2f} images/s")
    print(f"forward    : {r['forward_s'] * 1e3:9.1f} ms/step  {B / r['forward_s']:8.2f} images/s")
    if "teacher_s" in r:
        print(f"teacher    : {r['teacher_s'] * 1e3:9.1f} ms/step  = {r['teacher_s'] / r['train_s']:.1%} of the train step")
    print(f"peak memory: {r['peak_mem_gb']:.2f} GB ({'allocated on the GPU' if device.type == 'cuda' else 'process RSS'})")
    if "tflops_per_step" in r:
        print(f"FLOPs      : {r['tflops_per_step']:.2f} TFLOP/step" + (f", MFU {r['mfu']:.1%}" if "mfu" in r else ""))
    return r


if __name__ == "__main__":
    main()
