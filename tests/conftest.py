"""Shared test setup: no network, few threads, importable project files.

Run all tests: python -m pytest -q
"""
import functools
import os
import sys

# Tests must never reach the hub: every model is built from a config the test writes.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402

from model import ModelConfig  # noqa: E402

# 64-d heads like every released BERT (model.bert_config_from_weights infers the head count as hidden_size / 64)
TINY_BERT = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=64,
                 max_position_embeddings=32)


@pytest.fixture
def tiny_config():
    """Factory for a tiny random-weight ModelConfig (ResNet-18 at 64 px, 2+2 layers of width 32): builds in < 1 s."""
    def make(**overrides) -> ModelConfig:
        base = dict(backbone="resnet18", imsize=64, hidden_dim=32, nheads=4, dim_feedforward=64, enc_layers=2,
                    vl_layers=2, max_query_len=8, text_init="random", text_config=dict(TINY_BERT))
        return ModelConfig(**{**base, **overrides})
    return make


@pytest.fixture(scope="session")
def shapes_tok(tmp_path_factory):
    """The synthetic world's word-level BERT tokenizer (shapes.WORDS), written to a temp folder."""
    import data
    return data.load_tokenizer(os.path.dirname(data.write_shapes_vocab(str(tmp_path_factory.mktemp("shapes_vocab")))))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP (32-d towers, 64-d embeddings, 32 px images) with a word tokenizer, saved like a hub model."""
    from clip_teacher import save_random_clip

    directory = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    save_random_clip(directory, ["the", "red", "circle", "left"], projection_dim=64, text=TINY_CLIP_TOWER,
                     vision={"image_size": 32, "patch_size": 8, **TINY_CLIP_TOWER})
    return str(directory)


TINY_CLIP_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.fixture(scope="session")
def tiny_train_flags(tmp_path_factory):
    """train.py flags for a seconds-long run on the synthetic world: 64 px, 1+1 layers of width 32, the world's
    vocabulary written once (train.py builds it only at the preset's own path, out/shapes_vocab)."""
    import data
    vocab = os.path.dirname(data.write_shapes_vocab(str(tmp_path_factory.mktemp("shapes_vocab"))))
    return functools.partial(_tiny_train_flags, vocab=vocab)


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
