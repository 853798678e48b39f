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
