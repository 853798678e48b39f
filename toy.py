"""The synthetic world's recipe: the laptop preset, and the pretraining the paper's setting assumes.

    python toy.py                       # train the toy CLIP teacher into out/shapes_clip (train.py does it too)

Real EpmVG starts from weights made elsewhere: CLIP for the teacher, BERT and DETR for the student. The synthetic
world (shapes.py) has none, so this file makes them on the world itself, once, cached under out/ and loaded
through the same paths as the real ones (--teacher <folder>, --visual_init <DETR checkpoint>):
  PRESET            the toy-size TransVG and schedule that `python train.py` runs by default
  toy CLIP          a small transformers CLIPModel trained with CLIP's own objective (symmetric cross-entropy over
                    image-text similarities) on (canvas, expression) pairs of the world's captions split, scenes that
                    the grounding data never show, where the rare words are common; then frozen as the teacher
  toy DETR          the student's own visual branch (ResNet + encoder) trained to detect the world's objects from
                    the pixels alone, saved in DETR's checkpoint layout
  CachedVisual      the frozen visual branch's tokens and the frozen teacher's targets, computed once per scene
  prepare_world     what train.py calls before a shapes run: the vocabulary, the teacher and the DETR, if missing

Everything here goes through the project's own code paths (data.py's transforms, the student's encode_image,
CLIPTeacher's preprocessing and tokenizer), so the toy models are trained on exactly what they see later. There is
no toy BERT: a random 1-layer BERT over the world's 24 words, trained with the fusion, is enough (README).
"""

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
from tqdm import tqdm

import data
import shapes
import transforms
from clip_teacher import CLIPTeacher, save_random_clip
from model import DETR_PREFIXES, GroundingModel, ModelConfig, read_checkpoint, rename_keys
from runtime import DeviceEnv, UsageError, cli, parse_config, print0

# -----------------------------------------------------------------------------
# the laptop preset

# The paper's setting in miniature: the student starts from a pretrained visual branch (the toy DETR below, frozen,
# so its tokens are computed once per scene: CachedVisual) and learns BERT and the fusion on a small grounding split
# (10,000 scenes, in which shapes.RARE_WORDS are rare), while the toy CLIP has learned from 38,400 captions of other
# scenes that say every word at its natural frequency. A ResNet-18 to layer3 (stride 16) at a 64 px canvas gives
# 4 x 4 tokens; 1 encoder + 4 fusion layers of width 64; a 1-layer BERT over the world's 24 words without dropout;
# the fusion's positions start small (pos_std 0.02); 24 epochs in batches of 64 (3,744 steps), AdamW at 5e-4 with a
# cosine decay. The learning rate was chosen on the baseline (--distill none: 2e-3 never leaves the plateau of one
# central box, 1e-3 and 2.5e-4 end lower than 5e-4) and the distillation is added on top unchanged, as the paper adds
# it to TransVG's recipe (docs/synthetic_world.md). Data loading stays in the main process: on 2 cores a worker
# process only competes with the model for them.
PRESET = dict(backbone="resnet18", resnet_stages=3, trainable_bn=True, imsize=64, hidden_dim=64, nheads=4,
              dim_feedforward=128, dropout=0.0, enc_layers=1, vl_layers=4, pos_std=0.02, max_query_len=16,
              text_encoder="out/shapes_vocab", text_init="random",
              text_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 128, "max_position_embeddings": 32,
                           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
              visual_init="out/shapes_detr.pth", teacher="out/shapes_clip", cache_visual=True, augment=False,
              epochs=24, lr_schedule="cosine", warmup_steps=50, clip_grad=1.0, batch_size=64, micro_batch=64,
              lr=5e-4, lr_text=5e-4, shapes_train_size=10000, num_workers=0, eval_batch=250, eval_every=500)

# QRNet's visual branch reads the expression, so it can be neither the toy DETR nor cached: with a QRNet student
# (--backbone swin_toy_qrnet) the synthetic world's run learns it from scratch, on augmented 128 px canvases, with
# the earlier laptop recipe (README: 800 steps of 32, 2 + 2 layers of width 128) and a toy CLIP of its own.
QRNET_PRESET = dict(resnet_stages=4, visual_init="random", cache_visual=False, augment=True, imsize=128,
                    hidden_dim=128, dim_feedforward=256, dropout=0.1, enc_layers=2, vl_layers=2, pos_std=1.0,
                    text_config={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "intermediate_size": 256, "max_position_embeddings": 32},
                    teacher="out/shapes_clip_128", epochs=4, lr_drop=3, lr_schedule="step", warmup_steps=0,
                    clip_grad=0.0, batch_size=32, micro_batch=32, lr=2e-4, lr_visual=2e-4, lr_text=2e-4,
                    shapes_train_size=6400, eval_batch=64, eval_every=0)

# -----------------------------------------------------------------------------
# the toy CLIP teacher


@dataclass
class ToyCLIPConfig:
    out_dir: str = PRESET["teacher"]  # where the CLIP is saved (config, weights, tokenizer, metrics.json)
    steps: int = 600  # contrastive training steps (train.py: --toy_teacher_steps)
    batch_size: int = 64  # image-text pairs per step (the negatives of each pair), each a new scene of the captions
    captions: int = shapes.SPLITS["captions"][1]  # the scenes it may draw from: its "web", apart from the grounding
    lr: float = 1e-3  # AdamW, cosine decay to 0
    image_size: int = 64  # CLIP's input: the student's canvas is resized to this
    width: int = 128  # width of both towers
    layers: int = 2  # transformer layers in each tower
    embed_dim: int = 2 * PRESET["hidden_dim"]  # pools to the student's width by pairs, as CLIP's 512 -> 256 does
    imsize: int = PRESET["imsize"]  # the student's canvas side, which the teacher sees
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


def train_toy_clip(cfg: ToyCLIPConfig, train_set, eval_set, words: list[str]) -> dict:
    """Train a small CLIPModel on (canvas, expression) pairs of the synthetic world; save it to cfg.out_dir.

    It goes through CLIPTeacher's own preprocessing and tokenizer, so it is trained on exactly what it will see
    as a teacher: the student's augmented canvas, resized to image_size, and the post-flip expression."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    # built in a side folder and moved into place at the end: an interrupted build never looks like a teacher
    partial = cfg.out_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # what a killed build left
    tower = {"hidden_size": cfg.width, "intermediate_size": 2 * cfg.width, "num_hidden_layers": cfg.layers,
             "num_attention_heads": 4}
    save_random_clip(partial, words, projection_dim=cfg.embed_dim, text={"max_position_embeddings": 32, **tower},
                     vision={"image_size": cfg.image_size, "patch_size": 8, **tower})
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
    kw = {"imsize": cfg.imsize, "max_query_len": PRESET["max_query_len"], "image_size": cfg.shapes_image_size}
    train_set = data.ShapesWorld("captions", tokenizer, train=cfg.augment, size=cfg.captions, **kw)
    eval_set = data.ShapesWorld("val", tokenizer, train=False, size=cfg.eval_size, **kw)
    return train_toy_clip(cfg, train_set, eval_set, words)


# -----------------------------------------------------------------------------
# the toy DETR: the student's visual branch, pretrained on the world's images without a word of text

ATTRIBUTES = (("size", tuple(shapes.SIZES)), ("colour", tuple(shapes.COLOURS)), ("shape", shapes.SHAPE_NAMES))
VISUAL = ("backbone.", "input_proj.", "visual_encoder.")  # the visual branch's parameter names start so
VISUAL_FIELDS = ("backbone", "resnet_stages", "trainable_bn", "imsize", "hidden_dim", "nheads", "dim_feedforward",
                 "dropout", "enc_layers")  # the ModelConfig fields that shape the visual branch


@dataclass
class ToyDETRConfig:
    path: str = PRESET["visual_init"]  # where the checkpoint goes, in DETR's layout (--visual_init loads it)
    steps: int = 600  # training steps (train.py: --toy_detr_steps)
    batch_size: int = 32  # canvases per step (32 x 300 learned shapes better than 64 x 150 in the same time: README)
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


def _detection_batch(world: data.ShapesWorld, indices: list[int], stride: int) -> dict:
    samples = [world[i] for i in indices]
    return {**data.collate([{k: s[k] for k in ("image", "img_is_pad")} for s in samples]),
            **data.collate([cell_targets(s, world.scene(i), stride) for s, i in zip(samples, indices)])}


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
    head = nn.Linear(mcfg.hidden_dim, 1 + sum(len(names) for _, names in ATTRIBUTES) + 4)
    visual = [p for k, p in model.named_parameters() if k.startswith(VISUAL)]
    optimizer = torch.optim.AdamW([*visual, *head.parameters()], lr=cfg.lr, weight_decay=1e-4)
    # the train split's scenes as the default world draws them, whatever --shapes_rare_keep a run asks for: the
    # detector needs only the pictures, and one toy DETR then serves every regime of the words
    world = data.ShapesWorld("train", tokenizer, train=False, imsize=mcfg.imsize, max_query_len=mcfg.max_query_len,
                             size=cfg.train_size, image_size=cfg.shapes_image_size)
    order = torch.randperm(cfg.steps * cfg.batch_size, generator=torch.Generator().manual_seed(cfg.seed))
    model.train()
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        indices = (order[step * cfg.batch_size:(step + 1) * cfg.batch_size] % len(world)).tolist()
        batch = _detection_batch(world, indices, model.stride)
        vis, vis_is_pad, _ = model.encode_image(batch["image"], batch["img_is_pad"])
        loss, metrics = detection_loss(head(vis), batch, vis_is_pad)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            print(f"toy DETR step {step + 1}/{cfg.steps}: loss {loss.item():.3f}, " +
                  ", ".join(f"{k} {v:.3f}" if k == "box_l1" else f"{k} {v:.0f}%" for k, v in metrics.items()),
                  flush=True)
    model.eval()  # held-out scenes: what a frozen branch will know
    val = data.ShapesWorld("val", tokenizer, train=False, imsize=mcfg.imsize, max_query_len=mcfg.max_query_len,
                           size=512, image_size=cfg.shapes_image_size)
    with torch.no_grad():
        batch = _detection_batch(val, list(range(len(val))), model.stride)
        vis, vis_is_pad, _ = model.encode_image(batch["image"], batch["img_is_pad"])
        metrics = {f"val_{k}": v for k, v in detection_loss(head(vis), batch, vis_is_pad)[1].items()}
    # DETR's names (backbone.0.body.*, transformer.encoder.layers.*), so --visual_init loads it like detr-r50.pth
    sd, _ = rename_keys({k: v for k, v in model.state_dict().items() if k.startswith(VISUAL)},
                        {ours: theirs for theirs, ours in DETR_PREFIXES.items()})
    metrics.update(seconds=time.time() - t0)
    partial = cfg.path + ".partial"  # moved into place whole: a killed build never looks like a DETR
    os.makedirs(os.path.dirname(cfg.path) or ".", exist_ok=True)
    torch.save({"model": sd, "toy_config": asdict(cfg), "metrics": metrics}, partial)
    os.replace(partial, cfg.path)
    print(f"toy DETR saved to {cfg.path} in {metrics['seconds']:.0f} s; on 512 held-out scenes: " +
          ", ".join(f"{k[4:]} {v:.3f}" if k == "val_box_l1" else f"{k[4:]} {v:.0f}%" for k, v in metrics.items()
                    if k.startswith("val_")))
    return metrics


class CachedVisual(torch.utils.data.Dataset):
    """A dataset with its images replaced by what a frozen visual branch makes of them ("vis", "vis_is_pad", and
    the CNN's top-left cell "cnn": all that forward(visual=...) reads) and by a frozen teacher's targets
    ("teacher_image", "teacher_text"), computed once, in eval mode. A training step then costs BERT and the fusion
    only (2-core CPU, per sample: ~1.2 ms, against ~4 ms more for the frozen ResNet and ~1.7 ms for drawing the
    scene). Everything stays in memory, so it is for the synthetic world's sizes (20,000 scenes: ~110 MB), and only
    valid unaugmented. A trainable teacher's targets change every step, so with teacher_trainable the canvases are
    kept instead ("image", as the transform made them: ~1 GB at 64 px) and the teacher runs in the training step."""

    def __init__(self, dataset, model: GroundingModel, teacher, widths: tuple, device: torch.device,
                 batch_size: int = 256) -> None:
        keep_images = teacher is not None and teacher.trainable
        # its own generator: a loader otherwise draws a seed from the global RNG, which a resumed run has just restored
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=data.collate, generator=torch.Generator())
        keep, parts, was_training = ("input_ids", "attention_mask", "target"), {}, model.training
        self.text = []
        model.eval()
        with torch.no_grad():
            for batch in tqdm(loader, desc="frozen visual branch: caching its tokens", dynamic_ncols=True):
                images = batch["image"].to(device)
                vis, vis_is_pad, cnn = model.encode_image(images, batch["img_is_pad"].to(device))
                fields = {"vis": vis, "vis_is_pad": vis_is_pad, "cnn": cnn[:, :, :1, :1], **{k: batch[k] for k in keep}}
                if keep_images:
                    fields["image"] = batch["image"]
                elif teacher is not None:
                    image, text = teacher.targets(transforms.unnormalise(images), batch["text"], widths)
                    fields.update({k: v for k, v in (("teacher_image", image), ("teacher_text", text)) if v is not None})
                for k, v in fields.items():
                    parts.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
                self.text += batch["text"]
        model.train(was_training)
        self.fields = {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.fields.items()}, "text": self.text[i]}


# -----------------------------------------------------------------------------
# before a shapes run


def prepare_world(mcfg: ModelConfig, dcfg: data.DataConfig, teacher: str | None, teacher_steps: int,
                  detr_steps: int, env: DeviceEnv) -> None:
    """Make what a shapes run loads but nobody can download, once, by rank 0; later runs reuse it: the world's BERT
    vocabulary, its toy CLIP teacher (teacher None: no distillation) and its toy DETR (visual_init a file path).
    Only at the presets' own paths (TOY_PATHS): a path the user typed is used as it is or refused (not_built_here),
    never filled with toy files, and a hub name such as openai/clip-vit-base-patch16 never becomes a folder."""
    wanted, detr = toy_configs(mcfg, dcfg, teacher, teacher_steps, detr_steps)
    given = {"text_encoder": mcfg.text_encoder, "teacher": teacher, "visual_init": None if detr is None else detr.path}
    refused = [f"--{flag} {path}: no such {'file' if flag == 'visual_init' else 'folder'}; {how}"
               for flag, path in given.items() if path is not None and (flag == "visual_init" or os.path.isabs(path))
               for how in [not_built_here(flag, path, mcfg, dcfg, teacher_steps)] if how]
    if refused:  # train.check_inputs says so (and of relative ones, which may be hub names) before a run starts
        raise UsageError("\n".join(refused))

    def build_here(flag: str) -> bool:
        return env.is_master and given[flag] is not None and not os.path.exists(given[flag]) and \
            given[flag] in TOY_PATHS[flag]

    if build_here("text_encoder"):
        print0(f"writing the synthetic world's vocabulary to {data.write_shapes_vocab(mcfg.text_encoder)}")
    if build_here("teacher"):
        print0(f"no CLIP teacher at {teacher}: training the synthetic world's toy CLIP first "
               f"(python toy.py does the same)")
        build_toy_teacher(wanted)
    if build_here("visual_init"):
        print0(f"no visual branch at {detr.path}: pretraining the synthetic world's toy DETR first")
        build_toy_detr(detr, mcfg, data.load_tokenizer(mcfg.text_encoder))
    if env.ddp:
        torch.distributed.barrier()
    check_world_files(mcfg.text_encoder, wanted, detr)


def toy_configs(mcfg: ModelConfig, dcfg: data.DataConfig, teacher: str | None, teacher_steps: int,
                detr_steps: int) -> tuple["ToyCLIPConfig | None", "ToyDETRConfig | None"]:
    """The toy CLIP and toy DETR a shapes run asks for (None: it uses none), as check_world_files compares them."""
    wanted = None if teacher is None else ToyCLIPConfig(out_dir=teacher, steps=teacher_steps, imsize=mcfg.imsize,
                                                         shapes_image_size=dcfg.shapes_image_size)
    detr = None if mcfg.visual_init in ("random", "imagenet", "detr", "mask_rcnn") else ToyDETRConfig(
        path=mcfg.visual_init, steps=detr_steps, train_size=dcfg.shapes_train_size or shapes.SPLITS["train"][1],
        shapes_image_size=dcfg.shapes_image_size, model={k: getattr(mcfg, k) for k in VISUAL_FIELDS})
    return wanted, detr


# The only paths prepare_world builds toy models at, when they are missing: the presets' own
TOY_PATHS = {"text_encoder": (PRESET["text_encoder"],), "teacher": (PRESET["teacher"], QRNET_PRESET["teacher"]),
             "visual_init": (PRESET["visual_init"],)}


def not_built_here(flag: str, path: str, mcfg: ModelConfig, dcfg: data.DataConfig, teacher_steps: int) -> str | None:
    """For a path given to --text_encoder, --teacher or --visual_init (flag) on the synthetic world that does not
    exist: what to do instead, since prepare_world builds nothing there. None when it exists or is a preset's."""
    if os.path.exists(path) or path in TOY_PATHS[flag]:
        return None
    return {"text_encoder": f"the synthetic world's vocabulary is written on first use to {PRESET['text_encoder']} "
                            f"only; leave --text_encoder out to use it, or give a folder that holds a vocab.txt",
            "teacher": f"toy CLIPs are built on first use at {' and '.join(TOY_PATHS['teacher'])} only; to build "
                       f"one at {path} on purpose: python toy.py --out_dir {path} --steps {teacher_steps} --imsize "
                       f"{mcfg.imsize} --shapes_image_size {dcfg.shapes_image_size}",
            "visual_init": f"the toy DETR is built on first use at {PRESET['visual_init']} only; leave --visual_init "
                           f"out to use it, or pass random or a checkpoint that exists"}[flag]


def check_world_files(text_encoder: str, teacher: ToyCLIPConfig | None, detr: ToyDETRConfig | None = None) -> None:
    """Refuse a cached vocabulary, toy CLIP or toy DETR that was made by other code or settings than this run asks
    for, never reuse it silently. A CLIP folder without our metrics.json, or a checkpoint without our toy_config,
    is something someone supplied: it is used as given."""
    vocab = Path(text_encoder) / "vocab.txt"
    if vocab.exists() and not (Path(text_encoder) / "config.json").exists():  # a real BERT folder has one
        missing = sorted(set(shapes.WORDS) - set(vocab.read_text().split()))
        if missing:  # e.g. written by an older version of the world: its new words would all be [UNK]
            raise UsageError(f"{vocab} lacks words the synthetic world says ({', '.join(missing[:5])}); delete "
                             f"{text_encoder} to have it rewritten")
    record = None if teacher is None else Path(teacher.out_dir) / "metrics.json"
    if record is not None and record.exists():
        _same_settings(f"the toy CLIP at {teacher.out_dir}", json.loads(record.read_text()).get("config", {}),
                       teacher, "out_dir", "Delete the folder to rebuild it with this run's, or pass --teacher <another "
                       "folder>")
    if detr is not None and os.path.isfile(detr.path):
        built = read_checkpoint(detr.path).get("toy_config")
        if built is not None:
            _same_settings(f"the toy DETR {detr.path}", built, detr, "path", "Delete it to rebuild it with this "
                           "run's, or pass --visual_init <another path>")


def _same_settings(what: str, built: dict, wanted, skip: str, fix: str) -> None:
    diff = [f"{k} {built.get(k)!r} (this run: {v!r})" for k, v in asdict(wanted).items()
            if k != skip and built.get(k) != v]
    if diff:
        raise UsageError(f"{what} was built with other settings: {'; '.join(diff)}. {fix}")


def main(argv: list[str] | None = None) -> dict:
    cfg, = parse_config(argv, [ToyCLIPConfig], description="Train the synthetic world's toy CLIP teacher.")
    return build_toy_teacher(cfg)


if __name__ == "__main__":
    cli(main)
