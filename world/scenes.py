"""The synthetic referring-expression world: what a scene holds, how it is drawn, what can be said of it.

A scene is 2-5 coloured shapes on a muted background and an expression that singles one out by its attributes ("the
small red circle"), by its position among look-alikes ("the leftmost circle") or relative to a landmark ("the triangle
above the green circle"). All objects copy each attribute of a shared prototype with probability 1/2, so look-alikes
are common and the words matter. Scene i of a split is a pure function of (seed, split, i, rare_keep); the short side
is 62.5-100% of the long one, so the padding varies. Two colour words (RARE_WORDS) are rare in the train split and
common everywhere else, the toy CLIP's captions included: the paper's regime in miniature. This file knows nothing of
tokens, canvases or transforms (world/dataset.py).
"""

import functools
import random

import torch

# Sizes are fractions of the image's long side; the colours are far apart in hue so that the colour
# jitter cannot turn one into another.
SHAPE_NAMES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 205, 30),
           "purple": (150, 60, 200)}
SIZES = {"small": (0.16, 0.21), "big": (0.30, 0.36)}
_CHOICES = {"size": tuple(SIZES), "colour": tuple(COLOURS), "shape": SHAPE_NAMES}
_SUBSETS = [(), ("size",), ("colour",), ("shape",), ("size", "colour"), ("size", "shape"),
            ("colour", "shape"), ("size", "colour", "shape")]  # the attributes a description says
# (words, axis 0 = x / 1 = y, direction 1 = toward left / top). Both are mirror-symmetric in x, so a
# flip plus the left/right swap keeps every expression true.
_POSITIONS = ((("on the left", "leftmost"), 0, 1), (("on the right", "rightmost"), 0, -1),
              (("at the top",), 1, 1), (("at the bottom",), 1, -1))
_RELATIONS = (("to the left of", 0, 1), ("to the right of", 0, -1), ("above", 1, 1), ("below", 1, -1))
WORDS = (  # every word an expression can use: the tiny BERT's vocabulary
    "the", *SIZES, *COLOURS, *SHAPE_NAMES, "shape", "on", "at", "left", "right", "top", "bottom",
    "leftmost", "rightmost", "to", "of", "above", "below")
# (seed stream, default size). "captions" is not a grounding split: it is the toy CLIP's pretraining data, scenes
# with an expression for a uniformly drawn object and every word at its natural frequency (CLIP's web pairs).
SPLITS = {"train": (1, 20000), "val": (2, 1000), "test": (3, 1000), "captions": (4, 200000)}
# The paper's data regime in miniature: words that are common in the teacher's captions but rare in the grounding
# data. In the train split an expression that says one of them is kept with probability RARE_KEEP (otherwise the
# scene is described without them, or redrawn); val and test keep the natural mix, so that their rare slice
# measures what the grounding data under-teach.
RARE_WORDS = ("purple", "yellow")
RARE_KEEP = 0.05


@functools.cache
def _shape_mask(shape: str, side: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """bool (side, side) mask of a shape drawn in a side x side square, and its tight box xyxy."""
    c = (torch.arange(side) + 0.5) / side  # pixel centres in [0, 1]
    u, v = c.view(1, -1), c.view(-1, 1)  # x across, y down
    if shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":  # apex at the top centre, base along the bottom
        mask = (u - 0.5).abs() <= v / 2
    else:
        mask = torch.ones(side, side, dtype=torch.bool)
    cols, rows = mask.any(0).nonzero()[:, 0], mask.any(1).nonzero()[:, 0]
    return mask, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _describe(obj: dict, keys: tuple) -> str:
    """'small red circle' for keys (size, colour, shape); the noun is 'shape' when the shape is not said."""
    adjectives = [obj[k] for k in ("size", "colour") if k in keys]
    return " ".join(adjectives + [obj["shape"] if "shape" in keys else "shape"])


def _centre(o: dict, axis: int) -> float:
    return (o["box"][axis] + o["box"][axis + 2]) / 2


def _expressions(objects: list[dict], h: int, w: int) -> dict[str, list[str]]:
    """Every expression that singles out objects[0], by kind: attribute, position, relation."""
    target, out = objects[0], {"attribute": [], "position": [], "relation": []}

    def alike(ref, keys):
        return [o for o in objects if all(o[k] == ref[k] for k in keys)]

    for keys in _SUBSETS:
        group, d = alike(target, keys), _describe(target, keys)  # group[0] is the target
        if keys and len(group) == 1:
            out["attribute"].append(f"the {d}")
        for words, axis, sign in _POSITIONS:  # the extreme look-alike, clear of the others by 10%
            margin = 0.1 * (w, h)[axis]
            if len(group) > 1 and all(sign * (_centre(o, axis) - _centre(target, axis)) > margin
                                      for o in group[1:]):
                out["position"] += [f"the {d} {words[0]}"] + [f"the {most} {d}" for most in words[1:]]
        for mark in objects[1:]:  # a landmark with a description of its own
            mark_keys = next((k for k in _SUBSETS[1:] if alike(mark, k) == [mark]), None)
            others = [o for o in group[1:] if o is not mark]
            if mark_keys is None or not others:  # no landmark, or the relation is not needed
                continue
            for words, axis, sign in _RELATIONS:
                # the target lies wholly beyond the landmark's edge; no look-alike has its centre past the
                # landmark's centre on that side
                t_edge, m_edge = target["box"][axis + 2 * (sign > 0)], mark["box"][axis + 2 * (sign < 0)]
                if sign * (m_edge - t_edge) >= 0 and all(sign * (_centre(o, axis) - _centre(mark, axis)) >= 0
                                                         for o in others):
                    out["relation"].append(f"the {d} {words} the {_describe(mark, mark_keys)}")
    return {k: v for k, v in out.items() if v}


def says_rare(text: str) -> bool:
    """Whether an expression uses one of RARE_WORDS (its slice in val and test: "rare", else "frequent")."""
    return any(word in RARE_WORDS for word in text.split())


def scene(seed: int, split: str, i: int, image_size: int, rare_keep: float = RARE_KEEP) -> dict:
    """height, width, background (r, g, b), objects (dicts: size, colour, shape, side, xy, box = tight
    xyxy pixels; the target first) and the expression. rare_keep: RARE_KEEP for the train split (1 = natural)."""
    rng = random.Random((seed * 4 + SPLITS[split][0]) << 32 | i)
    while True:  # redrawn when nothing singles the target out (e.g. twins side by side), or only rare words do
        long, short = image_size, round(image_size * rng.choice((1.0, 0.875, 0.75, 0.625)))
        h, w = (long, short) if rng.random() < 0.5 else (short, long)
        objects = _place(rng, h, w)
        exprs = _expressions(objects, h, w)
        if split == "train" and rng.random() >= rare_keep:  # this scene is described without the rare words
            exprs = {k: kept for k, v in exprs.items() if (kept := [t for t in v if not says_rare(t)])}
        if exprs:
            text = rng.choice(exprs[rng.choice(sorted(exprs))])  # kind first, so that each kind is common
            background = tuple(rng.randint(100, 200) for _ in range(3))
            return {"height": h, "width": w, "background": background, "objects": objects, "text": text}


def _place(rng: random.Random, h: int, w: int) -> list[dict]:
    """2-5 objects, each copying each attribute of a shared random prototype with probability 1/2 (so look-alikes
    are common and the words matter); the target is drawn uniformly among them after placement and put first.
    Not the prototype itself: the object most like all others would then be the target, which a model could find
    without reading a word."""
    proto = {a: rng.choice(c) for a, c in _CHOICES.items()}
    objects = []
    for _ in range(rng.randint(2, 5)):
        obj = {a: proto[a] if rng.random() < 0.5 else rng.choice(c) for a, c in _CHOICES.items()}
        side = round(max(h, w) * rng.uniform(*SIZES[obj["size"]]))
        for _ in range(30):  # rejection sampling, 2 px apart; an object that finds no room is left out
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            if all(x >= o["xy"][0] + o["side"] + 2 or o["xy"][0] >= x + side + 2 or
                   y >= o["xy"][1] + o["side"] + 2 or o["xy"][1] >= y + side + 2 for o in objects):
                tx1, ty1, tx2, ty2 = _shape_mask(obj["shape"], side)[1]
                box = (x + tx1, y + ty1, x + tx2, y + ty2)
                objects.append({**obj, "side": side, "xy": (x, y), "box": box})
                break
    t = rng.randrange(len(objects))
    return [objects[t]] + objects[:t] + objects[t + 1:]


def sayable(sc: dict) -> set[str]:
    """Every expression that singles out some object of scene sc: what the world could have said of it, and the
    oracle behind the toy teacher's retrieval ceiling, where one expression can fit several scenes of a batch."""
    objs, out = sc["objects"], set()
    for k, o in enumerate(objs):
        for texts in _expressions([o] + objs[:k] + objs[k + 1:], sc["height"], sc["width"]).values():
            out.update(texts)
    return out


def draw(sc: dict) -> torch.Tensor:
    """The scene as a uint8 (3, height, width) image."""
    # (h, w, 3) then permuted: the channels-last layout torchvision's fast uint8 resize wants
    img = torch.empty(sc["height"], sc["width"], 3, dtype=torch.uint8)
    img[:] = torch.tensor(sc["background"], dtype=torch.uint8)
    for o in sc["objects"]:
        (x, y), s = o["xy"], o["side"]
        img[y:y + s, x:x + s][_shape_mask(o["shape"], s)[0]] = torch.tensor(COLOURS[o["colour"]], dtype=torch.uint8)
    return img.permute(2, 0, 1)
