"""Shared test setup: no network, few threads, importable project files.

Run all tests: python -m pytest -q
"""
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

# 64-d heads like every released BERT (load_transvg infers the head count as hidden_size / 64)
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
