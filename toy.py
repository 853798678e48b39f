"""The synthetic world's pretrained pieces, trained on the world itself: a toy CLIP teacher, a toy DETR, a toy Swin.

    python toy.py                       # train the toy CLIP teacher into out/shapes_clip (train.py does it too)

Real EpmVG starts from weights made elsewhere: CLIP for the teacher, BERT and DETR for the student. The synthetic
world (shapes.py) has none, so this file makes them on the world itself; world.py builds them before a run, once,
at the presets' paths under out/, and they load through the same flags as the real ones (--teacher <folder>,
--visual_init <DETR or Mask R-CNN checkpoint>):
  toy CLIP          a small transformers CLIPModel trained with CLIP's own objective (symmetric cross-entropy over
                    image-text similarities) on (canvas, expression) pairs of the world's captions split, scenes that
                    the grounding data never show, where the rare words are common; then frozen as the teacher
  toy DETR          the student's own visual branch (ResNet + encoder) trained to detect the world's objects from
                    the pixels alone, saved in DETR's checkpoint layout
  toy Swin          for a QRNet student: its Swin and the neck's lateral convs trained the same way, a toy Mask R-CNN
                    Swin saved in mmdet's layout; QD-ATT, which a detector has none of, is left out

Everything here goes through the project's own code paths (data.py's transforms, the student's visual branch,
CLIPTeacher's preprocessing and tokenizer), so the toy models are trained on exactly what they see later. There is
no toy BERT: a random 1-layer BERT over the world's 24 words, trained with the fusion, is enough.
"""

import functools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import box_convert

import data
import qrnet
import shapes
import transforms
from clip_teacher import CLIPTeacher, save_random_clip
from config import PRESETS, QRNET_PRESETS
from files import save_atomic
from flags import UsageError, cli, parse_config
from interop import DETR_PREFIXES, ours_to_official, rename_keys
from model import GroundingModel, ModelConfig

SHAPES = PRESETS["shapes"]  # the laptop run's recipe: the student these toy models serve
QRNET = QRNET_PRESETS["shapes"]  # what a QRNet student changes in it

# -----------------------------------------------------------------------------
# the toy CLIP teacher


@dataclass
class ToyCLIPConfig:
    out_dir: str = SHAPES["teacher"]  # where the CLIP is saved (config, weights, tokenizer, metrics.json)
    steps: int = data.DataConfig.toy_teacher_steps  # contrastive training steps (train.py: --toy_teacher_steps)
    batch_size: int = 64  # image-text pairs per step (the negatives of each pair), each a new scene of the captions
    captions: int = shapes.SPLITS["captions"][1]  # the scenes it may draw from: its "web", apart from the grounding
    lr: float = 1e-3  # AdamW, cosine decay to 0
    image_size: int = 64  # CLIP's input: the student's canvas is resized to this
    width: int = 128  # width of both towers
    layers: int = 2  # transformer layers in each tower
    embed_dim: int = 2 * SHAPES["hidden_dim"]  # pools to the student's width by pairs, as CLIP's 512 -> 256 does
    imsize: int = SHAPES["imsize"]  # the canvas it learns on: the world preset's, whatever the student's (world.py)
    shapes_image_size: int = 128  # long side of the world's images
    eval_size: int = 512  # held-out val pairs for the retrieval accuracy
    augment: bool = False  # train on augmented canvases; the preset's student sees unaugmented ones (cache_visual)
    seed: int = 0  # initialisation and data order


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's objective: (B,E), (B,E) -> symmetric cross-entropy of the B x B cosine similarities (pair i is i)."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B,B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def retrieval_accuracy(teacher: CLIPTeacher, loader: DataLoader) -> dict[str, float]:
    """Image -> text top-1 accuracy within each batch (%): a hit when the best-scoring expression is the image's
    own (or the same words: the world repeats short expressions like "the red circle"); over all images ("all")
    and over those whose own expression says a rare word ("rare")."""
    hits, rare_hits, total, rare = 0, 0, 0, 0
    for batch in loader:
        sims = teacher.encode_image(batch["rgb"]) @ F.normalize(teacher.encode_text(batch["text"]), dim=-1).T
        for j, t in zip(sims.argmax(dim=1).tolist(), batch["text"]):
            hit, is_rare = batch["text"][j] == t, shapes.says_rare(t)
            hits, rare_hits, total, rare = hits + hit, rare_hits + (hit and is_rare), total + 1, rare + is_rare
    return {"all": 100 * hits / total, "rare": 100 * rare_hits / max(rare, 1)}


def retrieval_ceiling(world: data.ShapesWorld, batch_size: int) -> float:
    """The best retrieval_accuracy any model could score on the same batches (%): an expression can be true of
    several scenes of a batch ("the red circle"), and an oracle that knows which (shapes.sayable) still has to
    pick one of those expressions at random, hitting the image's own words in |same words| / |true ones| cases."""
    total = 0.0
    for start in range(0, len(world), batch_size):
        scenes = [world.scene(i) for i in range(start, min(start + batch_size, len(world)))]
        texts = [sc["text"] for sc in scenes]
        for sc in scenes:
            said = shapes.sayable(sc)
            fits = [t for t in texts if t in said]  # never empty: its own expression fits
            total += fits.count(sc["text"]) / len(fits)
    return 100 * total / len(world)


def _pairs(samples: list[dict]) -> dict:
    """A batch of (canvas as RGB in [0,1], expression): what the teacher sees."""
    return {"rgb": transforms.unnormalise(torch.stack([s["image"] for s in samples])),
            "text": [s["text"] for s in samples]}


def save_toy_clip(directory: str, cfg: ToyCLIPConfig, words: list[str]) -> None:
    """The toy CLIP's architecture with random weights, saved like a hub model: where its training starts (and what
    bench.py times when no toy CLIP is built)."""
    tower = {"hidden_size": cfg.width, "intermediate_size": 2 * cfg.width, "num_hidden_layers": cfg.layers,
             "num_attention_heads": 4}
    save_random_clip(directory, words, projection_dim=cfg.embed_dim, text={"max_position_embeddings": 32, **tower},
                     vision={"image_size": cfg.image_size, "patch_size": 8, **tower})


def train_toy_clip(cfg: ToyCLIPConfig, train_set, eval_set, words: list[str]) -> dict:
    """Train a small CLIPModel on (canvas, expression) pairs of the synthetic world; save it to cfg.out_dir.

    It goes through CLIPTeacher's own preprocessing and tokenizer, so it is trained on exactly what it will see
    as a teacher: the student's augmented canvas, resized to image_size, and the post-flip expression."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    # built in a side folder and moved into place at the end: an interrupted build never looks like a teacher
    partial = cfg.out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # what a killed build left
    save_toy_clip(partial, cfg, words)
    teacher = CLIPTeacher(partial, device="cpu", trainable=True)
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=cfg.lr, weight_decay=0.1)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed), collate_fn=_pairs)
    model, step, losses = teacher.model, 0, []
    while step < cfg.steps:
        for batch in loader:
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            image = model.get_image_features(pixel_values=teacher.preprocess(batch["rgb"])).pooler_output
            text = model.get_text_features(**teacher.tokenize(batch["text"])).pooler_output
            loss = contrastive_loss(image, text, model.logit_scale)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            if step % 50 == 0 or step == cfg.steps:
                print(f"toy CLIP step {step}/{cfg.steps}: contrastive loss {sum(losses[-50:]) / len(losses[-50:]):.3f}",
                      flush=True)
            if step == cfg.steps:
                break
    model.save_pretrained(partial)
    frozen = CLIPTeacher(partial, device="cpu")
    eval_loader = DataLoader(eval_set, batch_size=cfg.batch_size, collate_fn=_pairs)
    top1 = retrieval_accuracy(frozen, eval_loader)
    metrics = {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
               "val_image_to_text_top1": top1["all"], "val_image_to_text_top1_rare": top1["rare"],
               "ceiling_top1": retrieval_ceiling(eval_set, cfg.batch_size),
               "chance_top1": 100 / cfg.batch_size, "seconds": time.time() - t0, "config": asdict(cfg)}
    with open(Path(partial) / "metrics.json", "w") as f:  # the settings travel with the weights (check_world_files)
        json.dump(metrics, f, indent=1)
    os.replace(partial, cfg.out_dir)
    print(f"toy CLIP teacher saved to {cfg.out_dir} in {metrics['seconds']:.0f} s: contrastive loss "
          f"{metrics['first_loss']:.2f} -> {metrics['last_loss']:.2f}; held-out image->text top-1 among "
          f"{cfg.batch_size}: {metrics['val_image_to_text_top1']:.1f}% (rare words: "
          f"{metrics['val_image_to_text_top1_rare']:.1f}%; an oracle: {metrics['ceiling_top1']:.1f}%; chance "
          f"{metrics['chance_top1']:.1f}%)")
    return metrics


def build_toy_teacher(cfg: ToyCLIPConfig) -> dict:
    """The synthetic world's train/val splits as the student sees them, then train_toy_clip."""
    if os.path.exists(cfg.out_dir):  # refused before minutes of training, not at the final move
        raise UsageError(f"--out_dir {cfg.out_dir} exists; delete it to build a new toy CLIP there, or give another "
                         f"--out_dir")
    with tempfile.TemporaryDirectory() as vocab_dir:  # the samples carry BERT ids too, which the teacher ignores
        data.write_shapes_vocab(vocab_dir)
        tokenizer = data.load_tokenizer(vocab_dir)
    # the world's words in shapes.py's order: a tokenizer's .vocab is a hash map whose order changes per process,
    # which would give the teacher different token ids, hence a different teacher, on every build
    words = list(shapes.WORDS)
    # CLIP's data, not the grounding split's: scenes of their own (the captions split) with every word at its natural
    # frequency, so the teacher has seen often the words that the grounding data say rarely (shapes.RARE_WORDS)
    kw = {"imsize": cfg.imsize, "max_query_len": SHAPES["max_query_len"], "image_size": cfg.shapes_image_size}
    train_set = data.ShapesWorld("captions", tokenizer, train=cfg.augment, size=cfg.captions, **kw)
    eval_set = data.ShapesWorld("val", tokenizer, train=False, size=cfg.eval_size, **kw)
    return train_toy_clip(cfg, train_set, eval_set, words)


# -----------------------------------------------------------------------------
# the toy DETR: the student's visual branch, pretrained on the world's images without a word of text (and what the
# toy Swin shares with it: the targets, the loss, the loop)

ATTRIBUTES = (("size", tuple(shapes.SIZES)), ("colour", tuple(shapes.COLOURS)), ("shape", shapes.SHAPE_NAMES))
VISUAL_FIELDS = ("backbone", "resnet_stages", "trainable_bn", "imsize", "hidden_dim", "nheads", "dim_feedforward",
                 "dropout", "enc_layers")  # the ModelConfig fields that shape the visual branch


@dataclass
class ToyDETRConfig:
    path: str = SHAPES["visual_init"]  # where the checkpoint goes, in DETR's layout (--visual_init loads it)
    steps: int = data.DataConfig.toy_detr_steps  # training steps (train.py: --toy_detr_steps)
    batch_size: int = 32  # canvases per step (32 x 300 learned shapes better than 64 x 150 in the same time)
    lr: float = 2e-3  # AdamW, 30 warmup steps, cosine decay to 0
    train_size: int = 20000  # the world's train scenes it learns from (unaugmented, as the preset's student)
    shapes_image_size: int = 128  # long side of the world's images
    seed: int = 0  # initialisation and data order
    model: dict | None = None  # the student's VISUAL_FIELDS: the architecture it trains


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


def _detection_batch(world: data.ShapesWorld, indices: list[int], strides: list[int]) -> tuple[dict, list[dict]]:
    """The scenes' canvases (image, img_is_pad) and their cell_targets at each stride."""
    samples = [world[i] for i in indices]
    return (data.collate([{k: s[k] for k in ("image", "img_is_pad")} for s in samples]),
            [data.collate([cell_targets(s, world.scene(i), stride) for s, i in zip(samples, indices)])
             for stride in strides])


def _detection_head(dim: int) -> nn.Linear:
    """A linear layer per token, (...,D) -> (...,1+classes+4) as detection_loss reads it; thrown away after."""
    return nn.Linear(dim, 1 + sum(len(names) for _, names in ATTRIBUTES) + 4)


def _detector_worlds(cfg, mcfg: ModelConfig, tokenizer) -> tuple[data.ShapesWorld, data.ShapesWorld]:
    """cfg.train_size unaugmented train scenes and 512 val ones (its metrics). The train split's scenes as the default
    world draws them, whatever --shapes_rare_keep a run asks for: a detector needs only the pictures, and one toy
    detector then serves every regime of the words."""
    kw = dict(train=False, imsize=mcfg.imsize, max_query_len=mcfg.max_query_len, image_size=cfg.shapes_image_size)
    return data.ShapesWorld("train", tokenizer, size=cfg.train_size, **kw), data.ShapesWorld("val", tokenizer, size=512,
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

    def batch_loss(world: data.ShapesWorld, indices: list[int]) -> tuple[torch.Tensor, dict]:
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

# QRNet starts from a Mask R-CNN Swin-S trained on COCO: its Swin (with the stage norms mmdet adds) and its FPN's
# lateral 1x1 convs, while QD-ATT, which a detector has none of, starts at its initialisation. The toy does the same on
# the world: Swin without QD-ATT, laterals and top-down sums (qrnet.QueryNeck.top_down), a per-cell head on each level.
SWIN_FIELDS = ("backbone", "swin", "imsize", "hidden_dim")  # the ModelConfig fields that shape the Swin and laterals


@dataclass
class ToySwinConfig:
    path: str = QRNET["visual_init"]  # where the checkpoint goes, in mmdet's layout (--visual_init loads it)
    steps: int = QRNET["toy_detr_steps"]  # training steps (train.py: --toy_detr_steps)
    batch_size: int = 32  # canvases per step
    lr: float = 2e-3  # AdamW, 30 warmup steps, cosine decay to 0
    train_size: int = shapes.SPLITS["train"][1]  # the train scenes it learns from (unaugmented): the run's (world.toy_configs)
    shapes_image_size: int = 128  # long side of the world's images
    seed: int = 0  # initialisation and data order
    model: dict | None = None  # the student's SWIN_FIELDS, swin resolved to its sizes: the architecture it trains


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


def _swin_detection(visual: qrnet.QRNetVisual, head: nn.Module, world: data.ShapesWorld, indices: list[int]
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


def main(argv: list[str] | None = None) -> dict:
    cfg, = parse_config(argv, [ToyCLIPConfig], description="Train the synthetic world's toy CLIP teacher.")
    return build_toy_teacher(cfg)


if __name__ == "__main__":
    cli(main)
