"""The synthetic world's recipe: the laptop preset, and the pretraining the paper's setting assumes.

    python toy.py                       # train the toy CLIP teacher into out/shapes_clip (train.py does it too)

Real EpmVG starts from weights made elsewhere: CLIP for the teacher (and BERT, DETR for the student). The synthetic
world (shapes.py) has none, so this file makes them on the world itself, once, cached under out/ and loaded
through the same paths as the real ones (--teacher <folder>):
  PRESET            the toy-size TransVG and schedule that `python train.py` runs by default
  toy CLIP          a small transformers CLIPModel trained with CLIP's own objective (symmetric cross-entropy over
                    image-text similarities) on the world's (canvas, expression) pairs, then frozen as the teacher
  prepare_world     what train.py calls before a shapes run: the world's BERT vocabulary and the teacher, if missing

Everything here goes through the project's own code paths (data.py's transforms, CLIPTeacher's preprocessing and
tokenizer), so the toy teacher is trained on exactly what it sees when it teaches.
"""

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data
import shapes
import transforms
from clip_teacher import CLIPTeacher, save_random_clip
from runtime import DeviceEnv, parse_config, print0

# -----------------------------------------------------------------------------
# the laptop preset

# Sized for a 2-core laptop CPU (with its toy CLIP teacher 8.5 minutes on one 2-core host, about 30 on two others:
# README): a ResNet-18 at 128 px learned from scratch (so ordinary BatchNorm, trainable_bn), a tiny BERT over the
# world's 24 words, 2 + 2 transformer layers of width 128, 800 steps of 32 with the lr x0.1 for the last quarter.
# Data loading stays in the main process: on 2 cores a worker process only competes with the model for them.
PRESET = dict(backbone="resnet18", trainable_bn=True, imsize=128, hidden_dim=128, nheads=4, dim_feedforward=256,
              enc_layers=2, vl_layers=2, max_query_len=16, text_encoder="out/shapes_vocab", text_init="random",
              text_config={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 256, "max_position_embeddings": 32},
              visual_init="random", teacher="out/shapes_clip", epochs=4, lr_drop=3, batch_size=32, micro_batch=32,
              lr=2e-4, lr_visual=2e-4, lr_text=2e-4, shapes_train_size=6400, num_workers=0, eval_batch=64)

# -----------------------------------------------------------------------------
# the toy CLIP teacher


@dataclass
class ToyCLIPConfig:
    out_dir: str = PRESET["teacher"]  # where the CLIP is saved (config, weights, tokenizer, metrics.json)
    steps: int = 400  # contrastive training steps
    batch_size: int = 64  # image-text pairs per step (the negatives of each pair)
    lr: float = 1e-3  # AdamW, cosine decay to 0
    image_size: int = 64  # CLIP's input: the student's canvas is resized to this
    width: int = 128  # width of both towers
    layers: int = 2  # transformer layers in each tower
    embed_dim: int = 2 * PRESET["hidden_dim"]  # pools to the student's width by pairs, as CLIP's 512 -> 256 does
    imsize: int = PRESET["imsize"]  # the student's canvas side, which the teacher sees
    shapes_image_size: int = 128  # long side of the world's images
    eval_size: int = 512  # held-out val pairs for the retrieval accuracy
    seed: int = 0  # initialisation and data order


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's objective: (B,E), (B,E) -> symmetric cross-entropy of the B x B cosine similarities (pair i is i)."""
    logits = logit_scale.exp() * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T  # (B,B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def retrieval_accuracy(teacher: CLIPTeacher, loader: DataLoader) -> float:
    """Image -> text top-1 accuracy within each batch (%): a hit when the best-scoring expression is the image's
    own (or the same words: the world repeats short expressions like "the red circle")."""
    hits = total = 0
    for batch in loader:
        sims = teacher.encode_image(batch["rgb"]) @ F.normalize(teacher.encode_text(batch["text"]), dim=-1).T
        best = sims.argmax(dim=1).tolist()
        hits += sum(batch["text"][j] == t for j, t in zip(best, batch["text"]))
        total += len(best)
    return 100 * hits / total


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
    metrics = {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
               "val_image_to_text_top1": retrieval_accuracy(frozen, eval_loader),
               "ceiling_top1": retrieval_ceiling(eval_set, cfg.batch_size),
               "chance_top1": 100 / cfg.batch_size, "seconds": time.time() - t0, "config": asdict(cfg)}
    with open(Path(partial) / "metrics.json", "w") as f:  # the settings travel with the weights (check_world_files)
        json.dump(metrics, f, indent=1)
    os.replace(partial, cfg.out_dir)
    print(f"toy CLIP teacher saved to {cfg.out_dir} in {metrics['seconds']:.0f} s: contrastive loss "
          f"{metrics['first_loss']:.2f} -> {metrics['last_loss']:.2f}; held-out image->text top-1 among "
          f"{cfg.batch_size}: {metrics['val_image_to_text_top1']:.1f}% (an oracle: {metrics['ceiling_top1']:.1f}%; chance "
          f"{metrics['chance_top1']:.1f}%)")
    return metrics


def build_toy_teacher(cfg: ToyCLIPConfig) -> dict:
    """The synthetic world's train/val splits as the student sees them, then train_toy_clip."""
    if os.path.exists(cfg.out_dir):  # refused before minutes of training, not at the final move
        raise FileExistsError(f"{cfg.out_dir} exists; delete it to build a new toy CLIP there, or give --out_dir")
    with tempfile.TemporaryDirectory() as vocab_dir:  # the samples carry BERT ids too, which the teacher ignores
        data.write_shapes_vocab(vocab_dir)
        tokenizer = data.load_tokenizer(vocab_dir)
    # the world's words in shapes.py's order: a tokenizer's .vocab is a hash map whose order changes per process,
    # which would give the teacher different token ids, hence a different teacher, on every build
    words = list(shapes.WORDS)
    world = data.DataConfig("shapes", shapes_image_size=cfg.shapes_image_size, shapes_eval_size=cfg.eval_size)
    kw = {"imsize": cfg.imsize, "max_query_len": PRESET["max_query_len"]}
    train_set = data.make_dataset(world, "train", tokenizer, train=True, **kw)
    eval_set = data.make_dataset(world, "val", tokenizer, train=False, **kw)
    return train_toy_clip(cfg, train_set, eval_set, words)


# -----------------------------------------------------------------------------
# before a shapes run


def prepare_world(text_encoder: str, teacher: str | None, teacher_steps: int, imsize: int, image_size: int,
                  env: DeviceEnv) -> None:
    """Make what a shapes run loads but nobody can download: the world's BERT vocabulary and its toy CLIP teacher
    (None: no distillation), once, by rank 0; later runs reuse them. Only at the preset's paths or at absolute
    ones: a hub name such as openai/clip-vit-base-patch16 must never become a local folder of toy files."""
    def ours(path: str, preset: str) -> bool:
        return not os.path.exists(path) and (path == preset or os.path.isabs(path))

    wanted = None if teacher is None else ToyCLIPConfig(out_dir=teacher, steps=teacher_steps, imsize=imsize,
                                                         shapes_image_size=image_size)
    if env.is_master and ours(text_encoder, PRESET["text_encoder"]):
        print0(f"writing the synthetic world's vocabulary to {data.write_shapes_vocab(text_encoder)}")
    if env.is_master and wanted is not None and ours(teacher, PRESET["teacher"]):
        print0(f"no CLIP teacher at {teacher}: training the synthetic world's toy CLIP first "
               f"(python toy.py does the same)")
        build_toy_teacher(wanted)
    if env.ddp:
        torch.distributed.barrier()
    check_world_files(text_encoder, wanted)


def check_world_files(text_encoder: str, teacher: ToyCLIPConfig | None) -> None:
    """Refuse a cached vocabulary or toy CLIP that was made by other code or settings than this run asks for, never
    reuse it silently. A folder without our metrics.json is a CLIP someone supplied: it is used as given."""
    vocab = Path(text_encoder) / "vocab.txt"
    if vocab.exists() and not (Path(text_encoder) / "config.json").exists():  # a real BERT folder has one
        missing = sorted(set(shapes.WORDS) - set(vocab.read_text().split()))
        if missing:  # e.g. written by an older version of the world: its new words would all be [UNK]
            raise ValueError(f"{vocab} lacks words the synthetic world says ({', '.join(missing[:5])}); delete "
                             f"{text_encoder} to have it rewritten")
    record = None if teacher is None else Path(teacher.out_dir) / "metrics.json"
    if record is None or not record.exists():
        return
    built = json.loads(record.read_text()).get("config", {})
    diff = [f"{k} {built.get(k)!r} (this run: {v!r})" for k, v in asdict(teacher).items()
            if k != "out_dir" and built.get(k) != v]
    if diff:
        raise ValueError(f"the toy CLIP at {teacher.out_dir} was built with other settings: {'; '.join(diff)}. "
                         f"Delete the folder to rebuild it with this run's, or pass --teacher <another folder>")


def main(argv: list[str] | None = None) -> dict:
    cfg, = parse_config(argv, [ToyCLIPConfig], description="Train the synthetic world's toy CLIP teacher.")
    return build_toy_teacher(cfg)


if __name__ == "__main__":
    main()
