"""Shared test setup: no network, few threads, importable project files, and what several test files build.

Run all tests: python -m pytest -q

Fixtures and helpers
  tiny_config          a factory of tiny random-weight ModelConfigs (a ResNet-18 TransVG; backbone="swin_toy_qrnet"
                       with swin=TINY_SWIN for QRNet); model: one tiny TransVG, in eval mode
  save_tiny_clip       a tiny random CLIP saved like a hub model; tiny_clip_dir: one, for the whole session
  world_vocab          the synthetic world's word-level BERT vocabulary, written once; shapes_tok: its tokenizer;
                       word_tok: a BERT tokenizer over a few words and wordpieces (the benchmarks' tests)
  tiny_train_flags     train.py flags for a seconds-long run on the synthetic world; checkpoint: one such run's last.pt
  torchrun             a script under torchrun with 2 CPU processes
  ours_to_transvg, ours_to_qrnet   our weights under the official names, to fabricate official checkpoints (the
                       library reads those formats, interop.py; of them it writes only mmdet's Swin, for the toy Swin)
"""
import functools
import os
import subprocess
import sys

# Tests must never reach the hub: every model is built from a config the test writes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402

from machinery import interop  # noqa: E402
from model import GroundingModel, ModelConfig  # noqa: E402

# 64-d heads like every released BERT (interop.bert_config_from_weights infers the head count as hidden_size / 64)
TINY_BERT = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=64,
                 max_position_embeddings=32)
# QRNet's Swin: 4 stages of widths 16/32/64/128 on a 64 px canvas (maps 16, 8, 4, 2), windows of 2 so stage 1 shifts
# (the toy QRNet's has 3 stages: test_qrnet's three-stage test)
TINY_SWIN = {"embed_dim": 16, "depths": [1, 2, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 2, "drop_path": 0.1}
TINY_CLIP_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}

# -----------------------------------------------------------------------------
# models


@pytest.fixture
def tiny_config():
    """Factory for a tiny random-weight ModelConfig (ResNet-18 at 64 px, 2+2 layers of width 32): builds in < 1 s."""
    def make(**overrides) -> ModelConfig:
        base = dict(backbone="resnet18", imsize=64, hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=2,
                    vl_layers=2, max_query_len=8, text_init="random", text_config=dict(TINY_BERT))
        return ModelConfig(**{**base, **overrides})
    return make


@pytest.fixture
def model(tiny_config):
    """A tiny TransVG student with random weights, in eval mode."""
    torch.manual_seed(0)
    return GroundingModel(tiny_config()).eval()


def save_tiny_clip(directory, projection_dim: int = 64, seed: int = 0) -> str:
    """A tiny random CLIP (32-d towers of one layer, 32 px images, 77 text positions) with a word tokenizer, saved
    like a hub model (no preprocessor config); its weights drawn after torch.manual_seed(seed)."""
    from world.toy_clip import save_random_clip

    torch.manual_seed(seed)
    save_random_clip(directory, ["the", "man", "red", "circle", "left"], projection_dim=projection_dim,
                     text=TINY_CLIP_TOWER, vision={"image_size": 32, "patch_size": 8, **TINY_CLIP_TOWER})
    return str(directory)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """save_tiny_clip's CLIP (64-d embeddings), once per session."""
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


# -----------------------------------------------------------------------------
# the synthetic world and train.py


@pytest.fixture(scope="session")
def world_vocab(tmp_path_factory) -> str:
    """A folder holding the synthetic world's word-level BERT vocab.txt (train.py writes its own only at the recipe's
    path, world/toy_models/vocab)."""
    from world.dataset import write_vocab
    return os.path.dirname(write_vocab(str(tmp_path_factory.mktemp("shapes_vocab"))))


@pytest.fixture(scope="session")
def shapes_tok(world_vocab):
    """The synthetic world's word-level BERT tokenizer."""
    import data
    return data.load_tokenizer(world_vocab)


@pytest.fixture(scope="session")
def word_tok(tmp_path_factory):
    """A BERT tokenizer over a few words and wordpieces, enough to see truncation and ## pieces."""
    d = tmp_path_factory.mktemp("word_vocab")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "right", "red", "car",
             "most", "-", ",", "lap", "##top", "bright", "a", "of"]
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    import data
    return data.load_tokenizer(str(d))


@pytest.fixture(scope="session")
def tiny_train_flags(world_vocab):
    """train.py flags for a seconds-long run on the synthetic world: 64 px, 1+1 layers of width 32."""
    return functools.partial(_tiny_train_flags, vocab=world_vocab)


def _tiny_train_flags(out_dir, *extra: str, vocab: str) -> list[str]:
    return [f"--out_dir={out_dir}", f"--text_encoder={vocab}", "--dataset=shapes", "--device=cpu",
            "--imsize=64", "--shapes_image_size=64", "--hidden_dim=32", "--nheads=2", "--dim_feedforward=64",
            "--enc_layers=1", "--vl_layers=1", "--max_query_len=16",
            '--text_config={"hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 1, '
            '"intermediate_size": 64, "max_position_embeddings": 32}',
            "--shapes_train_size=24", "--shapes_eval_size=9", "--batch_size=8", "--micro_batch=4",
            "--num_workers=0", "--eval_batch=4", "--distill=none",
            # the general machinery (augmentation, a trainable visual branch, an eval per epoch), not the preset's
            "--visual_init=random", "--cache_visual=false", "--augment=true", "--eval_every=0", "--lr=2e-4",
            "--lr_visual=2e-4", "--lr_text=2e-4", "--lr_schedule=step", "--warmup_steps=0", "--clip_grad=0", *extra]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tiny_train_flags):
    """The last.pt of a one-epoch tiny run on the synthetic world (no distillation), made once per session."""
    import train
    out = tmp_path_factory.mktemp("run")
    train.main(tiny_train_flags(out, "--epochs=1", "--final_eval=false"))
    return out / "last.pt"


def torchrun(script: str, *args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """python -m torch.distributed.run --standalone --nproc_per_node=2 <script> <args>, one thread per process,
    offline; script is relative to the project's root."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


# -----------------------------------------------------------------------------
# official checkpoints, fabricated from our weights (the inverses of interop.py's maps)


def ours_to_transvg(sd: dict, max_query_len: int) -> dict:
    """Our state dict under the official TransVG names (interop.TRANSVG_PREFIXES reversed), its position rows back in
    TransVG's [REG, L text, N visual] order."""
    sd, unmatched = interop.rename_keys(sd, {v: k for k, v in interop.TRANSVG_PREFIXES.items()})
    assert not unmatched, unmatched
    pos, L = sd["vl_pos_embed.weight"], max_query_len
    sd["vl_pos_embed.weight"] = torch.cat([pos[:1], pos[-L:], pos[1:-L]])
    return sd


def ours_to_qrnet(sd: dict, max_query_len: int) -> dict:
    """Our QRNet state dict under the official QRNet names; scale-embedding rows 0-2, which QRNet never reads, zero."""
    sd = dict(sd)
    scale = sd.pop("visual.scale_embed")  # (2,D)
    visual = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    rest = {k: v for k, v in sd.items() if not k.startswith("visual.")}
    return {**interop.ours_to_official(visual, "visumodel.backbone.", "visumodel.neck."),
            **ours_to_transvg(rest, max_query_len), "scale_embed.weight": torch.cat([scale.new_zeros(3, len(scale[0])),
                                                                                     scale])}
