"""world/recipe.py: the synthetic world's flags, checked when read, and the sizes they give each split.

Run: python -m pytest -q tests/test_world_recipe.py
(The recipes as train.py applies them: tests/test_machinery_recipes.py.)
"""
import re

import pytest

from machinery.flags import UsageError
from world.recipe import SHAPES, SHAPES_QRNET, WorldConfig


def test_a_split_has_its_flags_size_or_the_worlds_default():
    only_train = WorldConfig(shapes_train_size=30)
    assert [only_train.size(s) for s in ("train", "val", "test", "captions")] == [30, 1000, 1000, 200000]
    assert WorldConfig(shapes_eval_size=9).size("test") == 9
    assert WorldConfig(**{k: v for k, v in {**SHAPES, **SHAPES_QRNET}.items() if k in WorldConfig.__dataclass_fields__
                          }).size("train") == 10000  # the recipe's grounding split


@pytest.mark.parametrize("field, value, expected", [("shapes_train_size", -1, ">= 0"), ("toy_detector_steps", -5, ">= 0"),
                                                    ("shapes_image_size", 16, ">= 32 pixels"),
                                                    ("shapes_rare_keep", 1.5, "in [0, 1]")])
def test_bad_values_are_refused_when_read(field, value, expected):
    with pytest.raises(UsageError, match=re.escape(f"--{field}: expected {expected}, got {value}")):
        WorldConfig(**{field: value})
