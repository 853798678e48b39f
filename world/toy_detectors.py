"""The synthetic world's detectors: what the students' visual branches start from, trained on the world's pictures.

Real EpmVG starts TransVG's visual branch from a DETR trained on COCO and QRNet's from a Mask R-CNN Swin-S; the world's
are made here, from the run's train scenes' pictures (no text), through the project's own transforms and branches:
  toy DETR   the student's own visual branch (ResNet + encoder), saved in DETR's layout (--visual_init loads it)
  toy Swin   a QRNet student's Swin and the neck's lateral convs, in mmdet's layout; no QD-ATT (a detector has none)
"""

import functools
import math
import os
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

import data
import qrnet
from machinery.checkpoints import save_atomic
from machinery.flags import UsageError
from machinery.interop import DETR_PREFIXES, ours_to_official, rename_keys
from model import GroundingModel, ModelConfig
from world import scenes
from world.dataset import ShapesWorld
from world.recipe import SHAPES, SHAPES_QRNET, WorldConfig

# -----------------------------------------------------------------------------
# what both detectors learn: at each cell of the canvas, whether an object's centre lies there, its attributes, its box

ATTRIBUTES = (("size", tuple(scenes.SIZES)), ("colour", tuple(scenes.COLOURS)), ("shape", scenes.SHAPE_NAMES))


@dataclass
class ToyDetectorConfig:
    path: str = ""  # where the checkpoint goes (--visual_init loads it)
    steps: int = WorldConfig.toy_detector_steps  # training steps (train.py: --toy_detector_steps)
    batch_size: int = 32  # canvases per step (32 x 300 learned shapes better than 64 x 150 in the same time)
    lr: float = 2e-3  # AdamW, 30 warmup steps, cosine decay to 0
    train_size: int = scenes.SPLITS["train"][1]  # the train scenes it learns from, unaugmented (prepare: the run's)
    shapes_image_size: int = 128  # long side of the world's images
    seed: int = 0  # initialisation and data order
    model: dict | None = None  # the student's fields that shape what it trains (VISUAL_FIELDS, SWIN_FIELDS)


def cell_targets(sample: dict, scene: dict, stride: int) -> dict:
    """What a detector should say at each visual token (stride x stride cell, row-major) of an unaugmented canvas:
    objectness 1 at the cell holding an object's centre (the bigger object where two share one), its size / colour
    / shape as class indices (-100 elsewhere: ignored), and its box (cx, cy, w, h) as fractions of the canvas."""
    side = sample["image"].shape[-1]
    n = side // stride
    objectness, labels, box = torch.zeros(n * n), torch.full((n * n, len(ATTRIBUTES)), -100), torch.zeros(n * n, 4)
    scale, offset = sample["scale"].repeat(2), sample["pad_offset"].repeat(2)  # canvas = original * scale + offset
    for obj in sorted(scene["objects"], key=lambda o: o["side"]):
        xyxy = torch.tensor(obj["box"], dtype=torch.float32) * scale + offset
        cx, cy = ((xyxy[:2] + xyxy[2:]) / 2).tolist()
        cell = min(int(cy // stride), n - 1) * n + min(int(cx // stride), n - 1)
        objectness[cell] = 1
        labels[cell] = torch.tensor([names.index(obj[key]) for key, names in ATTRIBUTES])
        box[cell] = box_convert(xyxy, "xyxy", "cxcywh") / side
    return {"objectness": objectness, "labels": labels, "box": box}


def detection_loss(out: torch.Tensor, targets: dict, vis_is_pad: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """out (B,N,1+classes+4) from a linear head on the visual tokens -> objectness BCE on real cells + each
    attribute's cross-entropy + 5 x box L1 at object cells; and the accuracies (%) it reaches."""
    real, is_obj = ~vis_is_pad, targets["objectness"] > 0
    loss = F.binary_cross_entropy_with_logits(out[..., 0][real], targets["objectness"][real])
    metrics, at = {"objectness": 100 * ((out[..., 0][real] > 0) == is_obj[real]).float().mean().item()}, 1
    for j, (key, names) in enumerate(ATTRIBUTES):
        logits, labels = out[..., at:at + len(names)][is_obj], targets["labels"][is_obj][:, j]
        loss = loss + F.cross_entropy(logits, labels)
        metrics[key] = 100 * (logits.argmax(-1) == labels).float().mean().item()
        at += len(names)
    box_l1 = F.l1_loss(out[..., at:at + 4][is_obj].sigmoid(), targets["box"][is_obj])
    return loss + 5 * box_l1, {**metrics, "box_l1": box_l1.item()}


def _detection_batch(world: ShapesWorld, indices: list[int], strides: list[int]) -> tuple[dict, list[dict]]:
    """The scenes' canvases (image, img_is_pad) and their cell_targets at each stride."""
    samples = [world[i] for i in indices]
    return (data.collate([{k: s[k] for k in ("image", "img_is_pad")} for s in samples]),
            [data.collate([cell_targets(s, world.scene(i), stride) for s, i in zip(samples, indices)])
             for stride in strides])


def _detection_head(dim: int) -> nn.Linear:
    """A linear layer per token, (...,D) -> (...,1+classes+4) as detection_loss reads it; thrown away after."""
    return nn.Linear(dim, 1 + sum(len(names) for _, names in ATTRIBUTES) + 4)


def _detector_worlds(cfg, mcfg: ModelConfig, tokenizer) -> tuple[ShapesWorld, ShapesWorld]:
    """cfg.train_size unaugmented train scenes and 512 val ones (its metrics). The train split's scenes as the default
    world draws them, whatever --shapes_rare_keep a run asks for: a detector needs only the pictures, and one toy
    detector then serves every regime of the words."""
    kw = dict(train=False, imsize=mcfg.imsize, max_query_len=mcfg.max_query_len, image_size=cfg.shapes_image_size)
    return ShapesWorld("train", tokenizer, size=cfg.train_size, **kw), ShapesWorld("val", tokenizer, size=512,
                                                                                               **kw)


def _said(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if k.endswith("box_l1") else f"{k} {v:.0f}%" for k, v in metrics.items())


def _pretrain(what: str, cfg, params: list, batch_loss) -> None:
    """AdamW on params (30 warmup steps to cfg.lr, cosine decay to 0) over cfg.steps batches of cfg.batch_size of the
    first cfg.train_size train scenes in a seeded order; batch_loss(indices) -> (loss, metrics)."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    order = torch.randperm(cfg.steps * cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed))
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        loss, metrics = batch_loss((order[step * cfg.batch_size:(step + 1) * cfg.batch_size] % cfg.train_size).tolist())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            print(f"toy {what} step {step + 1}/{cfg.steps}: loss {loss.item():.3f}, {_said(metrics)}", flush=True)


def _save_detector(what: str, path: str, ckpt: dict, metrics: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_atomic(ckpt, path)  # moved into place whole: a killed build never looks like a detector
    print(f"toy {what} saved to {path} in {metrics['seconds']:.0f} s; on 512 held-out scenes: " +
          _said({k[4:]: v for k, v in metrics.items() if k.startswith("val_")}))


# -----------------------------------------------------------------------------
# the toy DETR: the student's visual branch (ResNet -> 1x1 conv -> encoder)

VISUAL_FIELDS = ("backbone", "resnet_stages", "trainable_bn", "imsize", "hidden_dim", "nheads", "dim_feedforward",
                 "dropout", "enc_layers")  # the ModelConfig fields that shape the visual branch


@dataclass
class ToyDETRConfig(ToyDetectorConfig):
    path: str = SHAPES["visual_init"]  # in DETR's layout


def build_toy_detr(cfg: ToyDETRConfig, mcfg: ModelConfig, tokenizer) -> dict:
    """Train the student's visual branch (ResNet -> 1x1 conv -> encoder) to detect every object of the world's
    canvases, as DETR is trained on COCO before TransVG starts from it, and save it in DETR's checkpoint layout.
    The head (one linear layer per token) is thrown away, like DETR's decoder."""
    if os.path.exists(cfg.path):
        raise UsageError(f"{cfg.path} exists; delete it to build a new toy DETR there")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    tiny_text = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8,
                 "vocab_size": 8, "max_position_embeddings": max(32, mcfg.max_query_len)}  # unused here
    model = GroundingModel(replace(mcfg, visual_init="random", text_init="random", text_config=tiny_text))
    torch.manual_seed(cfg.seed + 1)  # the head's draw, and the data order's, do not depend on the fusion's size
    head = _detection_head(mcfg.hidden_dim)
    world, val = _detector_worlds(cfg, mcfg, tokenizer)

    def batch_loss(world: ShapesWorld, indices: list[int]) -> tuple[torch.Tensor, dict]:
        batch, (targets,) = _detection_batch(world, indices, [model.visual.stride])
        vis, vis_is_pad, _ = model.visual(batch["image"], batch["img_is_pad"])  # tokens (B,N,D)
        return detection_loss(head(vis), targets, vis_is_pad)

    model.train()
    _pretrain("DETR", cfg, [*model.visual.parameters(), *head.parameters()], functools.partial(batch_loss, world))
    model.eval()  # held-out scenes: what a frozen branch will know
    with torch.no_grad():
        metrics = {f"val_{k}": v for k, v in batch_loss(val, list(range(len(val))))[1].items()}
    # DETR's names (backbone.0.body.*, transformer.encoder.layers.*), so --visual_init loads it like detr-r50.pth
    sd, _ = rename_keys(model.visual.state_dict(), {ours: theirs for theirs, ours in DETR_PREFIXES.items()})
    metrics.update(seconds=time.time() - t0)
    _save_detector("DETR", cfg.path, {"model": sd, "toy_config": asdict(cfg), "metrics": metrics}, metrics)
    return metrics


# -----------------------------------------------------------------------------
# the toy Mask R-CNN Swin: a QRNet student's Swin and the neck's lateral convs, pretrained like the toy DETR

# As QRNet's Mask R-CNN Swin-S: the Swin (with mmdet's stage norms), the FPN's lateral 1x1 convs and top-down sums
# (qrnet.QueryNeck.top_down), no QD-ATT (which starts at its initialisation); a per-cell head on each level.
SWIN_FIELDS = ("backbone", "swin", "imsize", "hidden_dim")  # the ModelConfig fields that shape the Swin and laterals


@dataclass
class ToySwinConfig(ToyDetectorConfig):
    path: str = SHAPES_QRNET["visual_init"]  # in mmdet's layout


def swin_fields(mcfg: ModelConfig) -> dict:
    """SWIN_FIELDS of a QRNet student's ModelConfig, its Swin's sizes spelled out (swin None: its backbone's)."""
    return {**{k: getattr(mcfg, k) for k in SWIN_FIELDS}, "swin": mcfg.swin or qrnet.SWIN_SIZES[mcfg.backbone]}


def _cell_relative(box: torch.Tensor, n: int) -> torch.Tensor:
    """Boxes (B,n*n,4) as cell_targets gives them (cx, cy, w, h of the canvas) -> the centre as its offset in its
    cell (0-1), w and h unchanged. A Swin has no absolute position (only relative biases inside windows), so it
    regresses the centre from where it looks, as an RPN does from its anchors."""
    cells = torch.arange(n * n)
    corner = torch.stack([cells % n, cells // n], dim=-1).to(box.dtype)  # (n*n,2): column, row of each cell
    return torch.cat([box[..., :2] * n - corner, box[..., 2:]], dim=-1)  # non-object cells: ignored by the loss


def _swin_detection(visual: qrnet.QRNetVisual, head: nn.Module, world: ShapesWorld, indices: list[int]
                    ) -> tuple[torch.Tensor, dict]:
    """The detection loss of the scenes, mean over the FPN levels, and its metrics per level (s4_colour, ...)."""
    strides = visual.strides  # a level per stage: Mask R-CNN's P2-P5 (P2-P4 for a 3-stage Swin)
    batch, targets = _detection_batch(world, indices, strides)
    levels = visual.neck.top_down(visual.stage_outputs(batch["image"], None))  # [(B,D,S/s,S/s)] per stride s
    total, metrics = 0.0, {}
    for stride, level, t in zip(strides, levels, targets):
        t["box"] = _cell_relative(t["box"], level.shape[-1])
        is_pad = F.interpolate(batch["img_is_pad"][:, None].float(), size=level.shape[-2:]).flatten(1).bool()
        loss, m = detection_loss(head(level.flatten(2).transpose(1, 2)), t, is_pad)  # tokens (B,h*w,D), row-major
        total = total + loss / len(levels)
        metrics.update({f"s{stride}_{k}": v for k, v in m.items()})
    return total, metrics


def build_toy_swin(cfg: ToySwinConfig, mcfg: ModelConfig, tokenizer) -> dict:
    """Train a QRNet student's Swin and lateral convs to detect every object of the world's canvases (a toy Mask
    R-CNN: FPN levels, one per-cell head shared by them, no text) and save them in mmdet's layout ({'meta': {toy_config,
    metrics}, 'state_dict': backbone.*, neck.lateral_convs.*}), which --visual_init loads as a Mask R-CNN Swin-S."""
    if os.path.exists(cfg.path):
        raise UsageError(f"{cfg.path} exists; delete it to build a new toy Swin there")
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    visual = qrnet.QRNetVisual(swin_fields(mcfg)["swin"], mcfg.hidden_dim, query_dim=1)  # its QD-ATT never runs
    head = _detection_head(mcfg.hidden_dim)
    world, val = _detector_worlds(cfg, mcfg, tokenizer)
    visual.train()  # QD-ATT and the scale embeddings get no gradient, so AdamW leaves them as they are
    _pretrain("Swin", cfg, [*visual.parameters(), *head.parameters()],
              functools.partial(_swin_detection, visual, head, world))
    visual.eval()  # held-out scenes: what the student starts from
    with torch.no_grad():
        metrics = {f"val_{k}": v for k, v in _swin_detection(visual, head, val, list(range(len(val))))[1].items()}
    detector = {k: v for k, v in visual.state_dict().items() if "qdatt." not in k and k != "scale_embed"}
    metrics.update(seconds=time.time() - t0)
    _save_detector("Swin", cfg.path, {"meta": {"toy_config": asdict(cfg), "metrics": metrics},
                                      "state_dict": ours_to_official(detector, "backbone.", "neck.")}, metrics)
    return metrics
