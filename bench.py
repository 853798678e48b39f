"""Benchmarks of the EpmVG reference implementation; each section prints its numbers.

Sections
  --data   images/s of the train and eval __getitem__ (file read + JPEG decode + transforms + tokenizer),
           one process, one thread, on COCO-sized JPEGs (640x480, 480x640, 500x375) in the RefCOCO split
           format. Goal: at least 2x the official TransVG pipeline per core.

Run
  python bench.py --data                                  # generates 64 JPEGs and a split file in a temp dir
  python bench.py --data --split_root DIR --tokenizer TOK  # time existing 'unc' split files, BERT's vocab
To compare with the official TransVG pipeline on the same files, run its timing script first
(shared/tools/transvg_reference/bench_data.py writes /tmp/transvg_ref/bench_splits), then
  python bench.py --data --split_root /tmp/transvg_ref/bench_splits --tokenizer <folder with vocab.txt>
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

import torch

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


def _word_vocab_tokenizer(texts: list[str], directory: str):
    """A BERT tokenizer over the words of texts: runs offline, where no BERT vocab may be at hand."""
    import data

    words = sorted({w for t in texts for w in t.lower().replace(",", " ").split()})
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return data.load_tokenizer(directory)


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
    import data

    threads, tmp = torch.get_num_threads(), tempfile.TemporaryDirectory()
    torch.set_num_threads(1)
    try:
        if split_root is None:
            split_root = make_bench_split(tmp.name, n=n)
            print(f"generated {n} JPEGs and split files in {tmp.name}")
        if tokenizer is None:
            print("note: no --tokenizer, so a word-level vocab of the phrases (costs about what BERT's does)")
            entries = torch.load(os.path.join(split_root, "unc", "unc_train.pth"), weights_only=True)
            tok = _word_vocab_tokenizer([e[3] for e in entries], tmp.name)
        else:
            tok = data.load_tokenizer(tokenizer)
        results = {"cpu": _cpu_name(), "threads": 1, "imsize": imsize, "torch": torch.__version__}
        for key, split in (("train", "train"), ("eval", "val")):
            ds = data.make_dataset("refcoco", split, tok, train=key == "train", imsize=imsize,
                                   split_root=split_root, data_root=data_root)
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="store_true", help="time the data pipeline")
    ap.add_argument("--split_root", default=None,
                    help="folder holding unc/unc_{train,val}.pth (default: generate them)")
    ap.add_argument("--data_root", default="ln_data", help="image root for relative paths in the split files")
    ap.add_argument("--tokenizer", default=None,
                    help="BERT hub name or folder with vocab.txt (default: a word vocab of the phrases)")
    ap.add_argument("--imsize", type=int, default=640, help="canvas side")
    ap.add_argument("--passes", type=int, default=3, help="timed passes over the images; prints the median")
    ap.add_argument("--n", type=int, default=64, help="images to generate when --split_root is not given")
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("choose a section to run: --data")
    return {"data": bench_data(args.split_root, args.data_root, args.tokenizer, args.passes, args.imsize,
                               args.n)}


if __name__ == "__main__":
    main()
