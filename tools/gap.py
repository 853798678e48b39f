"""The modality gap: the paper's Figure 2 (the student's visual and text features as two clouds that CLIP distillation
is said to bring together) as numbers and a picture, for paired features visual (N,D) and text (N,D), row i of each
from the same (image, expression) sample; pure functions, and the command that measures a checkpoint:
  centroid_gap        ||mean(v/|v|) - mean(t/|t|)||, Liang et al. 2022, "Mind the Gap" (arXiv 2203.02053), sec. 4;
                      0 = the clouds share a centre, 2 = the largest possible (opposite points of the unit sphere)
  paired_cosines      mean cosine of matched pairs (v_i, t_i) and of mismatched ones (v_i, t_j), i != j
  modality_probe      accuracy (%) of a logistic regression telling visual from text on held-out samples:
                      50 = the modalities overlap, 100 = fully separable
  pca_2d, gap_picture one PCA fitted on the union of both clouds, drawn as a scatter PNG (torchvision only)
  measure_splits      a checkpoint's features at a location (model.LOCATIONS) over each split: the numbers printed,
                      a PNG and a JSON per split (`python evaluate.py --ckpt ... --modality_gap`, which calls it)
All in fp32 on the L2-normalised features (scale is ignored); both need the same width D: features of different
widths live in different spaces, with no gap to measure between them.
"""

import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from machinery.checkpoints import write_atomic
from machinery.flags import UsageError
from machinery.runtime import DeviceEnv, print0

VISUAL_RGB, TEXT_RGB = (31, 119, 180), (255, 127, 14)  # blue and orange, told apart by colour-blind readers too

# -----------------------------------------------------------------------------
# measures


def _normalised(visual: torch.Tensor, text: torch.Tensor, min_n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the pair and return both L2-normalised in fp32: (N,D), (N,D). A zero row stays zero."""
    if visual.dim() != 2 or visual.shape != text.shape:
        raise ValueError(f"visual and text features must both be (N,D) with the same N and D (the same width: "
                         f"one space), got {tuple(visual.shape)} and {tuple(text.shape)}")
    if visual.shape[0] < min_n:
        raise ValueError(f"need at least {min_n} samples, got {visual.shape[0]}")
    return F.normalize(visual.float(), dim=1), F.normalize(text.float(), dim=1)


def centroid_gap(visual: torch.Tensor, text: torch.Tensor) -> float:
    """visual (N,D), text (N,D) -> ||mean_i v_i/|v_i| - mean_i t_i/|t_i|||, in [0, 2]."""
    v, t = _normalised(visual, text)
    return (v.mean(0) - t.mean(0)).norm().item()


def paired_cosines(visual: torch.Tensor, text: torch.Tensor) -> tuple[float, float]:
    """visual (N,D), text (N,D), N >= 2 -> (mean cos(v_i, t_i), mean over i != j of cos(v_i, t_j)).
    Matched above mismatched means the features know which expression goes with which image."""
    v, t = _normalised(visual, text, min_n=2)
    sim = v @ t.T  # (N,N): sim[i, j] = cos(v_i, t_j)
    n, matched = sim.shape[0], sim.diagonal().sum()
    return (matched / n).item(), ((sim.sum() - matched) / (n * (n - 1))).item()


def modality_probe(visual: torch.Tensor, text: torch.Tensor, steps: int = 200, seed: int = 0,
                   weight_decay: float = 1e-3) -> float:
    """visual (N,D), text (N,D), N >= 2 -> test accuracy (%) of a logistic regression (label 0 = visual, 1 = text)
    on the normalised features. A seeded permutation puts half the samples (both their visual and text rows) in
    the training half and the rest in the test half, so each half holds as many of one modality as of the other
    and chance is exactly 50 %. Full-batch L-BFGS from zero weights, a small L2 penalty so that separable data
    gives finite weights: deterministic for a given input."""
    v, t = _normalised(visual, text, min_n=2)
    order = torch.randperm(v.shape[0], generator=torch.Generator().manual_seed(seed))
    train, test = order[: v.shape[0] // 2], order[v.shape[0] // 2:]

    def xy(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (2n,D) features, (2n,) labels
        return torch.cat([v[rows], t[rows]]), torch.cat([torch.zeros(len(rows)), torch.ones(len(rows))])

    (x, y), (x_test, y_test) = xy(train), xy(test)
    w = torch.zeros(v.shape[1] + 1, requires_grad=True)  # (D+1,): weights, then the bias
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y) + weight_decay / 2 * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # callers may be under no_grad (evaluate.py is)
        opt.step(closure)
    with torch.no_grad():
        said_text = x_test @ w[:-1] + w[-1] > 0  # a logit of exactly 0 (no evidence) counts as "visual"
        return 100 * (said_text == y_test.bool()).sum().item() / len(y_test)  # in Python: 97.0, not 97.00000286


def gap_measures(visual: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """All the numbers for one (visual, text) pair of (N,D) features: what evaluate.py prints and saves."""
    matched, mismatched = paired_cosines(visual, text)
    return {"centroid_gap": centroid_gap(visual, text), "matched_cos": matched, "mismatched_cos": mismatched,
            "probe_acc": modality_probe(visual, text), "n": int(visual.shape[0])}


# -----------------------------------------------------------------------------
# picture


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """(N,D) -> (N,2) coordinates on the two principal axes of x (centred; SVD, so exact and deterministic).
    Each axis's sign is fixed so that its largest-magnitude loading is positive (sklearn's svd_flip, on V).
    Fewer than 2 axes (N < 2 or D < 2): the missing column is zeros."""
    x = x.float()
    xc = x - x.mean(0, keepdim=True)  # (N,D)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)  # vh (k,D): principal axes, by decreasing variance
    axes = vh[:2]  # (<=2,D)
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))  # (<=2,1)
    coords = xc @ (axes * torch.where(signs == 0, 1.0, signs)).T  # (N,<=2)
    return F.pad(coords, (0, 2 - coords.shape[1]))


def gap_picture(visual: torch.Tensor, text: torch.Tensor, caption: str, size: int = 480) -> torch.Tensor:
    """visual (N,D), text (N,D) -> uint8 (3, size + 24, size): the normalised features of both modalities on the
    two principal axes of ONE PCA fitted on their union (as in Figure 2), visual in blue and text in orange,
    one scale on both axes (distances are not distorted); a bar on top holds the legend and caption."""
    v, t = _normalised(visual, text)
    xy = pca_2d(torch.cat([v, t]))  # (2N,2)
    # interleave v_0, t_0, v_1, t_1, ... so that neither modality is always painted over the other
    n = v.shape[0]
    xy = torch.stack([xy[:n], xy[n:]], 1).reshape(-1, 2)  # (2N,2)
    rgb = torch.tensor([VISUAL_RGB, TEXT_RGB], dtype=torch.uint8).repeat(n, 1)  # (2N,3)
    margin, dot = 12, 2  # pixels: free border, and the half-width of a dot (5x5 squares)
    low, high = xy.min(0).values, xy.max(0).values
    scale = (size - 2 * margin) / (high - low).max().clamp_min(1e-12)
    centre = (low + high) / 2
    px = ((xy - centre) * scale + size / 2).round().long()  # (2N,2) column, row
    px[:, 1] = size - 1 - px[:, 1]  # up on the page = up the second axis
    plot = torch.full((3, size, size), 255, dtype=torch.uint8)
    for dy in range(-dot, dot + 1):
        for dx in range(-dot, dot + 1):
            c, r = (px[:, 0] + dx).clamp(0, size - 1), (px[:, 1] + dy).clamp(0, size - 1)
            plot[:, r, c] = rgb.T  # later points win ties, hence the interleaving
    picture = torch.cat([torch.full((3, 24, size), 255, dtype=torch.uint8), plot], dim=1)
    boxes = torch.tensor([[2, 3, 62, 21], [66, 3, 116, 21], [120, 3, size - 3, 21], [0, 24, size - 1, size + 23]],
                         dtype=torch.float32)
    return draw_bounding_boxes(picture, boxes, labels=["visual", "text", caption, None],
                               colors=[VISUAL_RGB, TEXT_RGB, (255, 255, 255), (160, 160, 160)],
                               label_colors=[VISUAL_RGB, TEXT_RGB, (0, 0, 0), (0, 0, 0)], width=1)


# -----------------------------------------------------------------------------
# a checkpoint's gap (evaluate.py --modality_gap)


@torch.no_grad()
def collect_features(model: torch.nn.Module, dataset: torch.utils.data.Dataset, loc: str, batch_size: int = 32,
                     num_workers: int = 0, dtype: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The student's features at distillation location loc (model.forward's out["distill"][loc]) for every sample,
    in dataset order: visual (N,Cv), text (N,Ct), fp32 on the CPU. Sharded like evaluate.evaluate(); every rank gets
    all."""
    from evaluate import predictions  # imported here: evaluate.py reaches this file lazily too

    cv, ct = model.distill_widths(loc)
    # starting empty, so that a rank with no samples (a split smaller than the world) still has rows to gather
    index, visual, text = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, cv)], [torch.zeros(0, ct)]
    for batch, out in predictions(model, dataset, batch_size, num_workers, dtype):
        v, t = out["distill"][loc]  # (B,Cv), (B,Ct)
        index.append(batch["index"])
        visual.append(v.float().cpu())
        text.append(t.float().cpu())
    parts = [(torch.cat(index), torch.cat(visual), torch.cat(text))]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (torch.cat(index), torch.cat(visual), torch.cat(text)))
    index, visual, text = (torch.cat(x) for x in zip(*parts))
    order = index.argsort()
    return visual[order], text[order]


GAP_LEGEND = "\n".join([  # printed under the table
    "  centroid gap: distance between the mean unit-length visual and text features (0 = one centre, 2 = opposite)",
    "  matched cos: mean cosine of each sample's own (visual, text) pair; mismatched cos: of other samples' pairs",
    "  probe %: held-out accuracy of a linear classifier telling visual from text (50 = overlap, 100 = separable)"])


def print_gap_table(results: dict[str, dict[str, float]], loc: str) -> None:
    print0(f"modality gap between the student's visual and text features at {loc}")
    print0(f"{'split':<10} {'n':>7} {'centroid gap':>13} {'matched cos':>12} {'mismatched cos':>15} {'probe %':>8}")
    for split, m in results.items():
        print0(f"{split:<10} {m['n']:>7} {m['centroid_gap']:>13.4f} {m['matched_cos']:>12.4f} "
               f"{m['mismatched_cos']:>15.4f} {m['probe_acc']:>8.2f}")
    print0(GAP_LEGEND)


def measure_splits(model: torch.nn.Module, datasets, cfg, env: DeviceEnv) -> dict[str, dict[str, float]]:
    """evaluate.py --modality_gap: gap_measures of the student's features at cfg.gap_loc over each dataset (cfg: its
    EvalConfig); the master writes <folder>/gap_<split>_<loc>.png and .json per split, folder = --out_dir or the
    checkpoint's. Refused before any split is read when the two features have different widths there."""
    cv, ct = model.distill_widths(cfg.gap_loc)
    if cv != ct:
        raise UsageError(f"--gap_loc {cfg.gap_loc}: this checkpoint's visual features there are {cv} wide and its text "
                         f"features {ct}, two different spaces with no gap to measure between them; use --gap_loc "
                         f"loc1 (the fused tokens, the distilled ones) or loc2")
    folder = cfg.out_dir or os.path.dirname(os.path.abspath(cfg.ckpt))
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--modality_gap writes into {folder}, which you cannot write to: pass --out_dir")
    results = {}
    for dataset in datasets:
        visual, text = collect_features(model, dataset, cfg.gap_loc, cfg.batch_size, cfg.num_workers, cfg.dtype)
        results[dataset.split] = m = gap_measures(visual, text)
        if env.is_master:
            stem = os.path.join(folder, f"gap_{dataset.split}_{cfg.gap_loc}")
            caption = (f"{dataset.split} {cfg.gap_loc}: gap {m['centroid_gap']:.2f}  cos {m['matched_cos']:.2f}/"
                       f"{m['mismatched_cos']:.2f}  probe {m['probe_acc']:.0f}%  n {m['n']}")
            write_atomic(stem + ".png", lambda tmp: write_png(gap_picture(visual, text, caption), tmp))
            saved = {"ckpt": cfg.ckpt, "dataset": dataset.name, "split": dataset.split, "loc": cfg.gap_loc,
                     "measures": m}

            def write_json(tmp: str) -> None:
                with open(tmp, "w") as f:
                    json.dump(saved, f, indent=1)
            write_atomic(stem + ".json", write_json)
            print0(f"{dataset.split}: {stem}.png (PCA of both; visual blue, text orange) and {stem}.json")
    print0(f"{dataset.name}, the student's features of {cfg.ckpt}")
    print_gap_table(results, cfg.gap_loc)
    return results
