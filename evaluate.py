"""Evaluate a grounding checkpoint: a per-split accuracy table, pictures, and single-image prediction.

    python evaluate.py --ckpt out/shapes/best.pt                      # every eval split of its dataset
    python evaluate.py --ckpt TransVG_unc.pth --dataset refcoco --tokenizer /path/to/bert-base-uncased
    python evaluate.py --ckpt out/shapes/best.pt --vis 8 --worst      # PNGs of the 8 worst predictions
    python evaluate.py --ckpt out/shapes/best.pt --image photo.jpg --text "the man on the left"
    python evaluate.py --ckpt out/shapes/best.pt --modality_gap --split val    # Figure 2, measured (tools/gap.py)
    torchrun --nproc_per_node=8 evaluate.py --ckpt ...                # same numbers, exact counts

Metric (paper sec. 4.1, TransVG's eval): a prediction is correct when its IoU with the ground truth is >= 0.5, in
original-image pixels: the predicted canvas box is clamped to the canvas (as TransVG does) and mapped back through the
eval resize and pad. Also Acc@0.75 and the mean IoU. hit_counts/summarise are pure; evaluate(model, dataset) shards the
split over ranks without padding and all-reduces the counts, exact for any world size (train.py calls it too).
--modality_gap measures, instead of accuracy, how far apart the student's visual and text features lie (the paper's
Figure 2, tools/gap.py): the numbers per split, and <checkpoint folder>/gap_<split>_<loc>.png and .json.
"""

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchvision.io import write_png
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import draw_bounding_boxes

import data
from losses import paired_iou_xyxy
from machinery.checkpoints import read_checkpoint
from machinery.flags import UsageError, check_fields, cli, parse_config
from machinery.interop import checkpoint_kind, load_model
from machinery.preflight import missing_inputs
from machinery.runtime import DTYPE_NAMES, amp_dtype, autocast_for, device_rule, print0, setup_device, shard_loader
from model import LOCATIONS, GroundingModel

# -----------------------------------------------------------------------------
# metrics (pure)


def hit_counts(iou: torch.Tensor) -> torch.Tensor:
    """(N,) IoUs -> float64 [N, hits at IoU >= 0.5, hits at IoU >= 0.75, sum of IoU]: sums, so they add across ranks."""
    iou = iou.double()
    return torch.stack([torch.tensor(float(iou.numel()), dtype=torch.float64), (iou >= 0.5).sum(),
                        (iou >= 0.75).sum(), iou.sum()])


def summarise(counts: torch.Tensor) -> dict[str, float]:
    n = max(counts[0].item(), 1.0)
    return {"acc@0.5": 100 * counts[1].item() / n, "acc@0.75": 100 * counts[2].item() / n,
            "miou": counts[3].item() / n, "n": int(counts[0].item())}


def predicted_xyxy(pred_cxcywh: torch.Tensor, imsize: int, scale: torch.Tensor, pad_offset: torch.Tensor
                   ) -> torch.Tensor:
    """(B,4) normalised canvas boxes -> (B,4) xyxy original pixels, clamped to the canvas like TransVG's eval."""
    boxes = data.canvas_to_original_xyxy(pred_cxcywh.float(), imsize, scale, pad_offset)
    low = (-pad_offset / scale).repeat(1, 2)  # the canvas corners, in original pixels
    high = ((imsize - pad_offset) / scale).repeat(1, 2)
    return torch.max(torch.min(boxes, high), low)


# -----------------------------------------------------------------------------
# evaluation loop


def predictions(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 32, num_workers: int = 0,
                dtype: str = "auto"):
    """(batch, model's output) over this rank's share of dataset, indices rank, rank + W, ... (no padding, unlike
    DistributedSampler), with the model in eval mode (then back as it was). Callers run it under no_grad."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        for batch in shard_loader(dataset, device, batch_size, num_workers):
            with autocast_for(device, dtype):
                yield batch, model(batch["image"].to(device, non_blocking=True), batch["img_is_pad"].to(device),
                                   batch["input_ids"].to(device), batch["attention_mask"].to(device))
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 32, num_workers: int = 0,
             keep_records: bool = False, dtype: str = "auto") -> tuple[dict[str, float], list]:
    """Accuracy of model on dataset: each rank scores its share (predictions()) and the hit counts are all-reduced, so
    the result is exact for any world size. Returns (metrics, records); records (all ranks' when keep_records) are
    (index, iou, pred_xyxy) per sample. A dataset with slices (the synthetic world's rare and frequent words) is also
    scored per slice: metrics["slices"]."""
    ddp, device = dist.is_initialized(), next(model.parameters()).device
    raw = getattr(model, "module", model)  # under DDP, the wrapped model holds the config
    imsize = getattr(raw, "_orig_mod", raw).cfg.imsize
    slices = getattr(dataset, "slices", ())
    counts, records = torch.zeros(1 + len(slices), 4, dtype=torch.float64), []  # row 0: all; row 1 + s: slice s
    for batch, out in predictions(model, dataset, batch_size, num_workers, dtype):
        pred = predicted_xyxy(out["pred_boxes"].float().cpu(), imsize, batch["scale"], batch["pad_offset"])
        iou = paired_iou_xyxy(pred, batch["gt_xyxy"])
        counts[0] += hit_counts(iou)
        if slices:
            of = torch.tensor([dataset.slice_of(int(i)) for i in batch["index"]])
            for s in range(len(slices)):
                counts[1 + s] += hit_counts(iou[of == s])
        if keep_records:
            records += [(int(i), float(v), p.tolist()) for i, v, p in zip(batch["index"], iou, pred)]
    if ddp:
        # gloo reduces CPU tensors; NCCL needs them on the GPU
        counts = counts.to(device)
        dist.all_reduce(counts)
        counts = counts.cpu()
        if keep_records:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = sorted(r for part in gathered for r in part)
    metrics = summarise(counts[0])
    if slices:
        metrics["slices"] = {name: summarise(counts[1 + s]) for s, name in enumerate(slices)}
    return metrics, records


# -----------------------------------------------------------------------------
# pictures


def draw_prediction(image: torch.Tensor, gt_xyxy: list[float] | None, pred_xyxy: list[float], caption: str
                    ) -> torch.Tensor:
    """uint8 (3,H,W) -> uint8 picture like the paper's Fig. 4: ground truth in green, prediction in yellow, the
    expression in a bar underneath. Small images are enlarged (long side 480) so that the text stays readable."""
    H, W = image.shape[1:]
    k = max(1.0, 480 / max(H, W))
    image = TF.resize(image, [round(H * k), round(W * k)], antialias=True)
    h, w = image.shape[1:]
    picture = torch.cat([image, torch.zeros(3, 24, w, dtype=torch.uint8)], dim=1)  # (3,h+24,w): the caption bar
    boxes, colors, labels = [[v * k for v in pred_xyxy]], ["yellow"], ["prediction"]
    if gt_xyxy is not None:
        boxes, colors, labels = [[v * k for v in gt_xyxy], *boxes], ["lime", *colors], ["ground truth", *labels]
    boxes.append([1, h + 1, w - 1, h + 23])  # a frame around the bar, to carry the caption as its label
    return draw_bounding_boxes(picture, torch.tensor(boxes, dtype=torch.float32), labels=[*labels, caption],
                               colors=[*colors, "white"], width=max(2, round(max(h, w) / 200)))


def save_pictures(dataset, records: list, out_dir: str, n: int, worst: bool, prefix: str) -> list[str]:
    """PNGs of n predictions: the first n samples, or the n with the lowest IoU."""
    os.makedirs(out_dir, exist_ok=True)
    chosen = sorted(records, key=lambda r: r[1])[:n] if worst else records[:n]
    paths = []
    for index, iou, pred in chosen:
        sample = dataset[index]
        picture = draw_prediction(dataset.original_image(index), sample["gt_xyxy"].tolist(), pred,
                                  f"IoU {iou:.2f}: {sample['text']}")
        paths.append(os.path.join(out_dir, f"{prefix}_{index:06d}.png"))
        write_png(picture, paths[-1])
    return paths


# -----------------------------------------------------------------------------
# command line


@dataclass
class EvalConfig:
    ckpt: str = ""  # our checkpoint (train.py) or an official TransVG one (e.g. TransVG_unc.pth)
    dataset: str = ""  # default: the dataset the checkpoint was trained on
    split: str = ""  # default: every evaluation split of the dataset
    split_root: str = ""  # default: the checkpoint's, else data
    data_root: str = ""  # default: the checkpoint's, else ln_data
    tokenizer: str = ""  # BERT tokenizer name or directory; default: the model's text_encoder
    batch_size: int = 32  # images per device
    num_workers: int = 2  # data loader processes
    device: str = "auto"  # auto (cuda > mps > cpu), cuda, mps or cpu
    dtype: str = "auto"  # auto (bf16 autocast on GPUs that have it, else fp32), float32, bfloat16 or float16
    json: str = ""  # also write the numbers to this file
    vis: int = 0  # save this many pictures per split (green = ground truth, yellow = prediction)
    worst: bool = False  # pictures of the lowest-IoU predictions instead of the first ones
    out_dir: str = ""  # where pictures go; default: <checkpoint folder>/vis (--modality_gap: <checkpoint folder>)
    drop_invalid: bool = False  # skip split entries with no expression or a zero-area box (the table counts them)
    image: str = ""  # predict on this image instead of a dataset (needs --text)
    text: str = ""  # the referring expression for --image
    modality_gap: bool = False  # instead of accuracy: the gap between the student's visual and text features (Fig. 2)
    gap_loc: str = "loc1"  # where --modality_gap reads them (model.LOCATIONS): loc1 = the fused tokens, the distilled

    CHOICES = {"dtype": DTYPE_NAMES, "gap_loc": tuple(LOCATIONS)}

    def __post_init__(self) -> None:  # refused before the checkpoint is read, not after a whole evaluation
        check_fields(self, [
            ("text", bool(self.image) == bool(self.text), "--text and --image together (or neither)"),
            ("text", not self.text or data.has_word(self.text), "an expression with a word in it"),
            ("dataset", not self.dataset or self.dataset in data.DATASETS, f"one of {', '.join(data.DATASETS)}"),
            ("batch_size", self.batch_size >= 1, ">= 1"), ("num_workers", self.num_workers >= 0, ">= 0"),
            device_rule(self.device), ("vis", self.vis >= 0, ">= 0"),
            ("modality_gap", not (self.modality_gap and (self.image or self.vis)),
             "no --image or --vis with it (they belong to the accuracy table)"),
            ("json", not self.json or os.access(os.path.dirname(os.path.abspath(self.json)), os.W_OK),
             "a file in an existing folder you can write to")])


def print_table(results: dict[str, dict[str, float]]) -> None:
    print0(f"{'split':<10} {'n':>7} {'Acc@0.5':>8} {'Acc@0.75':>9} {'mIoU':>7}")
    for split, m in results.items():
        skipped = f"   ({m['skipped']} invalid entries skipped, not counted)" if m.get("skipped") else ""
        print0(f"{split:<10} {m['n']:>7} {m['acc@0.5']:>8.2f} {m['acc@0.75']:>9.2f} {m['miou']:>7.3f}{skipped}")
        for name, s in m.get("slices", {}).items():
            print0(f"{'  ' + name:<10} {s['n']:>7} {s['acc@0.5']:>8.2f} {s['acc@0.75']:>9.2f} {s['miou']:>7.3f}")


def run_data_config(ckpt: dict, cfg: EvalConfig) -> data.DataConfig:
    """The data settings of the run that wrote ckpt, with --dataset, --split_root and --data_root on top when
    given. A TransVG checkpoint has none, but names its dataset by the split folder (unc, gref_umd, ...)."""
    saved = dict(ckpt.get("data_config") or {})
    if not saved:
        folders = {info.folder: name for name, info in data.DATASETS.items() if info.folder}
        saved["dataset"] = folders.get((ckpt.get("args") or {}).get("dataset"), "")
    given = {k: getattr(cfg, k) for k in ("dataset", "split_root", "data_root", "drop_invalid") if getattr(cfg, k)}
    if not {**saved, **given}["dataset"]:
        raise UsageError(f"which dataset? the checkpoint does not say: pass --dataset ({', '.join(data.DATASETS)})")
    return data.DataConfig(**{**saved, **given})


@torch.no_grad()
def predict_image(model: GroundingModel, tokenizer, path: str, text: str, out_dir: str, dtype: str = "auto") -> dict:
    """Box (x1, y1, x2, y2) in the image's pixels for one expression (EvalConfig has checked it has a word), and a PNG
    of it."""
    image = data.read_image(path)
    H, W = image.shape[1:]
    # no ground truth here: the whole image stands in for the box the transform carries along
    sample = data.transform_sample(image, torch.tensor([0.0, 0.0, W, H]), text.lower(), train=False,
                                   imsize=model.cfg.imsize)
    ids, mask = data.tokenize(data.make_encoder(tokenizer, model.cfg.max_query_len), sample["text"])
    if (ids[mask.bool()] == tokenizer.unk_token_id).sum() == mask.sum() - 2:  # [CLS] and [SEP] around nothing known
        raise UsageError(f"--text {text!r}: the tokenizer knows none of its words (all [UNK])")
    batch = data.collate([{**sample, "input_ids": ids, "attention_mask": mask}])
    device = next(model.parameters()).device
    with autocast_for(device, dtype):
        out = model(batch["image"].to(device), batch["img_is_pad"].to(device), batch["input_ids"].to(device),
                    batch["attention_mask"].to(device))
    box = predicted_xyxy(out["pred_boxes"].float().cpu(), model.cfg.imsize, batch["scale"], batch["pad_offset"])[0]
    box = torch.max(torch.min(box, torch.tensor([W, H, W, H])), torch.zeros(4))  # inside the image
    os.makedirs(out_dir, exist_ok=True)
    png = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + "_prediction.png")
    write_png(draw_prediction(image, None, box.tolist(), text), png)
    print(f"{text!r} in {path} ({W}x{H}): box x1={box[0]:.1f} y1={box[1]:.1f} x2={box[2]:.1f} y2={box[3]:.1f} "
          f"(pixels); picture {png}")
    return {"box_xyxy": box.tolist(), "picture": png}


def check_request(cfg: EvalConfig) -> tuple[dict, data.DataConfig | None]:
    """What evaluate.py is asked, refused before the model is built: (the checkpoint's contents, the data settings to
    evaluate on; None for --image)."""
    if not cfg.ckpt:
        raise UsageError("--ckpt: give a checkpoint of train.py or an official TransVG or QRNet one")
    ckpt = read_checkpoint(cfg.ckpt, "--ckpt")
    if checkpoint_kind(ckpt) not in ("ours", "qrnet", "transvg"):
        raise UsageError(f"--ckpt {cfg.ckpt}: neither a checkpoint of train.py (no 'model_config') nor an official "
                         f"TransVG or QRNet one (no 'model' dict with vl_pos_embed.weight)")
    if cfg.image:
        if not os.path.isfile(cfg.image):
            raise UsageError(f"--image {cfg.image}: no such file")
        return ckpt, None
    dcfg = run_data_config(ckpt, cfg)
    if cfg.split:
        data.check_split(dcfg.dataset, cfg.split)
    missing = missing_inputs(dcfg, [cfg.split] if cfg.split else data.DATASETS[dcfg.dataset].eval_splits)
    if missing:  # every file the evaluation reads
        raise UsageError("\n".join(missing))
    return ckpt, dcfg


def weights_said(path: str, ckpt: dict) -> str:
    """Which weights a checkpoint holds, as the table's heading says: train.py's step and epoch, and whether they are
    its run's best val epoch (best.pt: what to compare with a paper's table) or its latest (last.pt); an official one's
    epoch."""
    if "model_config" not in ckpt:
        return f"{path}: an official checkpoint, epoch {ckpt.get('epoch', '?')}"
    kind = {"best.pt": "the run's best val epoch", "last.pt": "the run's latest"}.get(os.path.basename(path), "")
    return f"{path}: the weights of step {ckpt.get('step')} (epoch {ckpt.get('epoch')}){', ' + kind if kind else ''}"


def checked_tokenizer(cfg: EvalConfig, model: GroundingModel):
    """--tokenizer, or the one the model was trained with; one with ids past BERT's embedding table is refused."""
    tokenizer = data.load_tokenizer(cfg.tokenizer or model.cfg.text_encoder)
    words = model.text_encoder.config.vocab_size
    if len(tokenizer) > words:  # its ids past the embedding table would fail deep inside BERT
        raise UsageError(f"--tokenizer {cfg.tokenizer or model.cfg.text_encoder}: it has {len(tokenizer)} tokens "
                         f"but the checkpoint's text encoder embeds {words}: pass the --tokenizer it was trained with")
    return tokenizer


def main(argv: list[str] | None = None) -> dict:
    cfg, = parse_config(argv, [EvalConfig], description=__doc__)
    ckpt, dcfg = check_request(cfg)
    env = setup_device(cfg.device)
    try:
        amp_dtype(env.device, cfg.dtype)  # --dtype bfloat16 on a CPU: refused here, not at the first batch
        model = load_model(cfg.ckpt, env.device, ckpt=ckpt)
        tokenizer = checked_tokenizer(cfg, model)
        out_dir = cfg.out_dir or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "vis")
        if cfg.image:
            return predict_image(model, tokenizer, cfg.image, cfg.text, out_dir, cfg.dtype)
        splits = [cfg.split] if cfg.split else data.DATASETS[dcfg.dataset].eval_splits
        datasets = (data.make_dataset(dcfg, split, tokenizer, train=False, imsize=model.cfg.imsize,
                                      max_query_len=model.cfg.max_query_len, world=ckpt.get("world_config"))
                    for split in splits)  # one at a time, as each is scored
        if cfg.modality_gap:  # the paper's Figure 2, measured instead of the accuracy
            from tools import gap
            results = gap.measure_splits(model, datasets, cfg, env)
        else:
            results = {}
            for dataset in datasets:
                results[dataset.split], records = evaluate(model, dataset, cfg.batch_size, cfg.num_workers,
                                                           keep_records=cfg.vis > 0, dtype=cfg.dtype)
                results[dataset.split]["skipped"] = dataset.skipped
                if cfg.vis and env.is_master:
                    paths = save_pictures(dataset, records, out_dir, cfg.vis, cfg.worst, f"{dcfg.dataset}_"
                                          f"{dataset.split}")
                    print0(f"{dataset.split}: {len(paths)} pictures in {out_dir}")
            print0(f"{dcfg.dataset}, {weights_said(cfg.ckpt, ckpt)}")
            print_table(results)
        if cfg.json and env.is_master:
            gap_loc = {"gap_loc": cfg.gap_loc} if cfg.modality_gap else {}
            with open(cfg.json, "w") as f:
                json.dump({"ckpt": cfg.ckpt, "dataset": dcfg.dataset, **gap_loc, "results": results}, f, indent=1)
        return results
    finally:
        if env.ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
