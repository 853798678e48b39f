"""The synthetic world's CLIP teacher: a small transformers CLIPModel trained with CLIP's own objective on the world.

    python world/toy_clip.py --out_dir out/my_clip     # train one (the recipe's ships in world/toy_models/clip)

Real EpmVG distils from a CLIP trained on 400 M web pairs; the world's is a CLIPModel with small towers, trained with
CLIP's contrastive objective on (canvas, expression) pairs of the captions split (scenes the grounding data never show,
where the rare words are common), through CLIPTeacher's own preprocessing and tokenizer, then frozen as the teacher.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

if __package__ in (None, ""):  # run as a file (python world/toy_clip.py): the project's root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from clip_teacher import CLIPTeacher  # noqa: E402
from machinery.flags import UsageError, cli, parse_config  # noqa: E402
from world import scenes  # noqa: E402
from world.dataset import ShapesWorld, write_vocab  # noqa: E402
from world.recipe import SHAPES, WorldConfig  # noqa: E402

# -----------------------------------------------------------------------------
# a CLIP of random weights with a tokenizer of the words given: where the toy CLIP starts, and what tests and
# benchmarks build where no real CLIP can be downloaded


def save_word_tokenizer(directory: str | Path, words: list[str] = ()) -> CLIPTokenizer:
    """Save a CLIP BPE tokenizer over printable ASCII whose merges spell each of `words` as one token.

    Any text tokenises (unknown words fall back to characters); the words given, e.g. the synthetic world's
    vocabulary, become single tokens, as real words mostly are in OpenAI's 49k vocabulary. Specials come last,
    as in OpenAI's vocabulary, so <|endoftext|> has the largest id.
    """
    chars = [chr(c) for c in range(33, 127)]
    merges = []
    for word in dict.fromkeys(w.lower() for w in words if len(w) > 1):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]  # BPE's end-of-word marker rides on the last character
        prefix = pieces[0]
        for piece in pieces[1:]:
            merges.append((prefix, piece))
            prefix += piece
    merges = list(dict.fromkeys(merges))
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def save_random_clip(directory: str | Path, words: list[str] = (), *, projection_dim: int = 512,
                     vision: dict | None = None, text: dict | None = None) -> CLIPTokenizer:
    """Save a CLIPModel with random weights (torch's global RNG) and a save_word_tokenizer tokenizer to directory,
    like a hub model without a preprocessor config: for tests, benchmarks and the synthetic world's toy teacher,
    where no real CLIP can be downloaded. vision / text: CLIPVisionConfig / CLIPTextConfig fields on top of
    transformers' defaults (ViT-B/32's shape); the text tower's vocabulary and special ids come from the tokenizer."""
    tokenizer = save_word_tokenizer(directory, words)
    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = CLIPConfig(projection_dim=projection_dim, text_config={**ids, **(text or {})},
                        vision_config=dict(vision or {}))
    CLIPModel(config).save_pretrained(str(directory))
    return tokenizer


# -----------------------------------------------------------------------------
# the toy CLIP


@dataclass
class ToyCLIPConfig:
    out_dir: str = SHAPES["teacher"]  # where the CLIP is saved (config, weights, tokenizer, metrics.json)
    steps: int = WorldConfig.toy_teacher_steps  # contrastive training steps (train.py: --toy_teacher_steps)
    batch_size: int = 64  # image-text pairs per step (the negatives of each pair), each a new scene of the captions
    captions: int = scenes.SPLITS["captions"][1]  # the scenes it may draw from: its "web", apart from the grounding
    lr: float = 1e-3  # AdamW, cosine decay to 0
    image_size: int = 64  # CLIP's input: the student's canvas is resized to this
    width: int = 128  # width of both towers
    layers: int = 2  # transformer layers in each tower
    embed_dim: int = 2 * SHAPES["hidden_dim"]  # pools to the student's width by pairs, as CLIP's 512 -> 256 does
    imsize: int = SHAPES["imsize"]  # the canvas it learns on: the recipe's, whatever the student's (prepare.py)
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
            hit, is_rare = batch["text"][j] == t, scenes.says_rare(t)
            hits, rare_hits, total, rare = hits + hit, rare_hits + (hit and is_rare), total + 1, rare + is_rare
    return {"all": 100 * hits / total, "rare": 100 * rare_hits / max(rare, 1)}


def retrieval_ceiling(world: ShapesWorld, batch_size: int) -> float:
    """The best retrieval_accuracy any model could score on the same batches (%): an expression can be true of
    several scenes of a batch ("the red circle"), and an oracle that knows which (scenes.sayable) still has to
    pick one of those expressions at random, hitting the image's own words in |same words| / |true ones| cases."""
    total = 0.0
    for start in range(0, len(world), batch_size):
        batch = [world.scene(i) for i in range(start, min(start + batch_size, len(world)))]
        texts = [sc["text"] for sc in batch]
        for sc in batch:
            said = scenes.sayable(sc)
            fits = [t for t in texts if t in said]  # never empty: its own expression fits
            total += fits.count(sc["text"]) / len(fits)
    return 100 * total / len(world)


def _pairs(samples: list[dict]) -> dict:
    """A batch of (canvas as RGB in [0,1], expression): what the teacher sees."""
    return {"rgb": data.unnormalise(torch.stack([s["image"] for s in samples])),
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
        write_vocab(vocab_dir)
        tokenizer = data.load_tokenizer(vocab_dir)
    # the world's words in scenes.py's order: a tokenizer's .vocab is a hash map whose order changes per process,
    # which would give the teacher different token ids, hence a different teacher, on every build
    words = list(scenes.WORDS)
    # CLIP's data, not the grounding split's: scenes of their own (the captions split) with every word at its natural
    # frequency, so the teacher has seen often the words that the grounding data say rarely (scenes.RARE_WORDS)
    kw = {"imsize": cfg.imsize, "max_query_len": SHAPES["max_query_len"], "image_size": cfg.shapes_image_size}
    train_set = ShapesWorld("captions", tokenizer, train=cfg.augment, size=cfg.captions, **kw)
    eval_set = ShapesWorld("val", tokenizer, train=False, size=cfg.eval_size, **kw)
    return train_toy_clip(cfg, train_set, eval_set, words)


def main(argv: list[str] | None = None) -> dict:
    cfg, = parse_config(argv, [ToyCLIPConfig], description="Train the synthetic world's toy CLIP teacher.")
    return build_toy_teacher(cfg)


if __name__ == "__main__":
    cli(main)
