"""config.py: a resumed run continues with its checkpoint's settings; only the flags that may change, change.

Run: python -m pytest -q tests/test_config.py
(The presets: tests/test_flags.py for --help and precedence, tests/test_qrnet.py for QRNet's recipe.)
"""
import dataclasses

import pytest

from config import merge_resumed
from flags import UsageError


def test_resumed_configs_take_only_the_flags_that_may_change():
    @dataclasses.dataclass
    class A:
        lr: float = 1.0
        device: str = "cpu"
        table: dict | None = None

    saved = [{"lr": 0.5, "device": "cuda", "table": {"a": 1, "b": 2}}]
    resumed, = merge_resumed([A(lr=0.5, device="cpu", table={"a": 1})], saved, {"device", "table", "lr"},
                             {"device"}, "--resume x")
    assert resumed == A(lr=0.5, device="cpu", table={"a": 1, "b": 2})  # a part of a saved dict given: the same
    with pytest.raises(UsageError, match=r"--resume x: lr 0.5 -> 2.0"):
        merge_resumed([A(lr=2.0)], saved, {"lr"}, {"device"}, "--resume x")
