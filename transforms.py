"""How one referring-expression sample becomes the model's input: TransVG's augmentation and the eval letterbox.

    transform_sample(image uint8 (3,H,W), box xyxy (4,) in its pixels, text) -> canvas, padding mask, target box,
                                                                               the (post-flip) text, the affine map

Train follows TransVG's recipe (--aug_scale --aug_crop --aug_translate; blur off as in its commands), scaled to the
canvas: random long side, or a short-side resize plus a crop that keeps the whole box (never for position words),
colour jitter, a flip that also swaps the whole words left/right, ImageNet normalisation, random placement on the
square canvas. Eval: long side to the canvas, centred. Every sample carries the exact canvas <-> original map
(scale, pad_offset), so canvas_to_original_xyxy inverts any of them. unnormalise undoes the normalisation (what CLIP
gets); IMAGENET_MEAN / IMAGENET_STD are defined here, once. Randomness comes from torch's global RNG (and
train.py seeds it per sample).

Box convention: pixel edges, x in [0, W]; pixel i covers [i, i+1). A flip maps x to W - x (TransVG's).
References: TransVG (github.com/djiajunustc/TransVG @ c862427) datasets/transforms.py, re-written from a written
description of it (no code copied). This file imports nothing from the project.
"""

import math
import re

import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.ops import box_convert

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_GREY = torch.tensor([0.299, 0.587, 0.114])  # PIL's RGB -> "L" weights
# -----------------------------------------------------------------------------
# text: the words a flip and a crop have to respect
# Whole words only (TransVG replaces substrings: "bright" -> "bleft", and "laptop" counts as "top"), in the forms
# RefCOCO's writers use: a prefix (topleft, upperright, farleft) and a suffix (leftmost, leftside, lefthand,
# rightward, leftest); "left-most", "far-left" and "left side" split into words, so they match too.
_PREFIX, _SUFFIX = r"(?:top|bottom|upper|lower|far|middle|center|centre)?", r"(?:most|side|hand|wards?|est)?"
_LEFT_RIGHT = re.compile(rf"\b({_PREFIX})(left|right)({_SUFFIX})\b")
# TransVG's five words (and their forms above), centre, upper/lower, above/below: a crop can cut out what they
# point at, or change which object they pick.
_SPATIAL = re.compile(rf"\b{_PREFIX}(?:left|right|top|bottom|middle|center|centre|upper|lower){_SUFFIX}\b|"
                      r"\b(?:above|below)\b")


def swap_left_right(text: str) -> str:
    """Swap the whole words left <-> right, in all their forms (leftmost, leftside, topleft, ...): the text side
    of a flip."""
    return _LEFT_RIGHT.sub(lambda m: m[1] + ("right" if m[2] == "left" else "left") + m[3], text)


def has_spatial_word(text: str) -> bool:
    """True if a crop could make the expression wrong (position words, matched as whole words)."""
    return _SPATIAL.search(text) is not None


# -----------------------------------------------------------------------------
# image, box and text together

# TransVG's train sizes are for a 640 canvas; other canvases scale them by imsize / 640.
_LONG_SIDES, _SHORT_SIDES, _CROP_SIDES = range(448, 641, 32), (400, 500, 600), (384, 600)


def _randint(lo: int, hi: int) -> int:
    """Uniform in [lo, hi]; torch's RNG, so every DataLoader worker draws differently."""
    return int(torch.randint(lo, hi + 1, ()))


def _resize_side(img, box, affine, side: int, long_side: bool = True):
    """Resize image (3,H,W) and box so that the long (or short) side is `side`, keeping the aspect ratio
    (TransVG's round()); affine (sx, sy, ox, oy) follows the pixels, per axis."""
    h, w = img.shape[-2:]
    r = side / (max(h, w) if long_side else min(h, w))
    nh, nw = round(h * r), round(w * r)
    rx, ry = nw / w, nh / h  # per axis: TransVG scales the box by r, which is off by the rounding
    affine = (affine[0] * rx, affine[1] * ry, affine[2] * rx, affine[3] * ry)
    # antialias=True is what PIL's bilinear (TransVG's) does when shrinking.
    return F.resize(img, [nh, nw], antialias=True), F.resize(box, [nh, nw]), affine


def _crop_keeping_box(img, box, affine, lo: int, hi: int):
    """Random crop with sides in [lo, hi] that contains the whole box; no crop if none can.

    Hand-written: TransVG's check is axis-swapped and can cut the target out entirely. Here the size is
    drawn among the sizes that fit the box, then the offset among those that keep it inside."""
    h, w = img.shape[-2:]
    x1, y1, x2, y2 = box[0].tolist()
    eps = 1e-4  # float noise from the resizes, not a pixel
    left, top = math.floor(x1 + eps), math.floor(y1 + eps)
    right, bottom = math.ceil(x2 - eps), math.ceil(y2 - eps)
    if left < 0 or top < 0 or right > w or bottom > h:  # a (bad) annotation poking out of the image
        return img, box, affine
    if max(lo, right - left) > min(w, hi) or max(lo, bottom - top) > min(h, hi):  # no allowed crop holds it
        return img, box, affine
    cw, ch = _randint(max(lo, right - left), min(w, hi)), _randint(max(lo, bottom - top), min(h, hi))
    j, i = _randint(max(0, right - cw), min(left, w - cw)), _randint(max(0, bottom - ch), min(top, h - ch))
    affine = (affine[0], affine[1], affine[2] - j, affine[3] - i)
    return F.crop(img, i, j, ch, cw), F.crop(box, i, j, ch, cw), affine


def _color_jitter_(x: torch.Tensor) -> None:
    """TransVG's ColorJitter(0.4, 0.4, 0.4), in place on x (3,h,w) float in [0,255]: brightness, contrast,
    saturation in random order, each a blend with black / the mean grey / the grey image by a factor in
    [0.6, 1.4], then clipped (PIL ImageEnhance's maths). Hand-written because v2.ColorJitter allocates a
    new image per step and costs 3-8x more; on the canvas view it adds ~0.7 ms per 640 image."""
    for op in torch.randperm(3).tolist():
        f = 0.6 + 0.8 * float(torch.rand(()))
        if op == 0:
            x.mul_(f)
        elif op == 1:
            x.mul_(f).add_((1 - f) * float(_GREY @ x.mean((1, 2))))  # mean of the grey image
        else:
            r, g, b = x.unbind(0)
            grey = (r * _GREY[0]).add_(g, alpha=_GREY[1]).add_(b, alpha=_GREY[2])  # (h,w); one temporary
            x.mul_(f).add_(grey.mul_(1 - f))
        x.clamp_(0, 255)


def _normalise_into_canvas(img: torch.Tensor, imsize: int, top: int, left: int, jitter: bool = False):
    """Paste uint8 image (3,h,w) at (top, left) on a zero canvas (3,S,S), jittered if asked, ImageNet-
    normalised; and img_is_pad (S,S). Hand-written because it is the hot loop: working in place on the
    canvas view is ~8x faster than v2.ToDtype + v2.Normalize + v2.Pad, which each allocate an image."""
    h, w = img.shape[-2:]
    canvas = torch.zeros(3, imsize, imsize)
    view = canvas[:, top:top + h, left:left + w]
    view.copy_(img)  # uint8 -> float in [0, 255]
    if jitter and torch.rand(()) < 0.8:
        _color_jitter_(view)
    view.mul_(1 / (255 * IMAGENET_STD)).sub_(IMAGENET_MEAN / IMAGENET_STD)  # (x / 255 - mean) / std
    img_is_pad = torch.ones(imsize, imsize, dtype=torch.bool)
    img_is_pad[top:top + h, left:left + w] = False
    return canvas, img_is_pad


def transform_sample(image: torch.Tensor, gt_xyxy: torch.Tensor, text: str, *, train: bool,
                     imsize: int) -> dict:
    """uint8 image (3,H,W), box (4,) xyxy original pixels, lower-cased text -> the sample minus tokens.

    Train follows TransVG (all of --aug_crop --aug_scale --aug_translate, blur off as in its commands);
    eval: long side to imsize, centred pad. Randomness comes from torch's global RNG."""
    orig_h, orig_w = image.shape[-2:]
    # clamping_mode=None: TransVG does not clip boxes to the image; the odd annotation that pokes out stays
    box = tv_tensors.BoundingBoxes(gt_xyxy.view(1, 4), format="XYXY", canvas_size=(orig_h, orig_w),
                                   clamping_mode=None)
    affine = (1.0, 1.0, 0.0, 0.0)  # (sx, sy, ox, oy): current pixels = original * s + o
    if not train:
        image, box, affine = _resize_side(image, box, affine, imsize)
        h, w = image.shape[-2:]
        top, left = (imsize - h) // 2, (imsize - w) // 2  # = TransVG's round((S - h) / 2 - 0.1)
    else:
        k = imsize / 640
        if not has_spatial_word(text) and torch.rand(()) < 0.5:  # crop branch; never for spatial words
            short = round(k * _SHORT_SIDES[_randint(0, 2)])
            image, box, affine = _resize_side(image, box, affine, short, long_side=False)
            lo, hi = (round(k * c) for c in _CROP_SIDES)
            image, box, affine = _crop_keeping_box(image, box, affine, lo, hi)
        long = round(k * _LONG_SIDES[_randint(0, len(_LONG_SIDES) - 1)])
        image, box, affine = _resize_side(image, box, affine, long)
        h, w = image.shape[-2:]
        if torch.rand(()) < 0.5:  # flip; before the colour jitter (they commute), on the cheaper uint8
            image, box, text = F.horizontal_flip(image), F.horizontal_flip(box), swap_left_right(text)
            affine = (-affine[0], affine[1], w - affine[2], affine[3])
        top, left = _randint(0, imsize - h), _randint(0, imsize - w)  # translate augmentation
    canvas, img_is_pad = _normalise_into_canvas(image, imsize, top, left, jitter=train)
    shift = torch.tensor([left, top, left, top], dtype=torch.float32)
    target = box_convert(box.as_subclass(torch.Tensor)[0] + shift, "xyxy", "cxcywh") / imsize
    return {"image": canvas, "img_is_pad": img_is_pad, "target": target, "text": text,
            "orig_size": torch.tensor([orig_h, orig_w]),
            "scale": torch.tensor(affine[:2], dtype=torch.float32),
            "pad_offset": torch.tensor([affine[2] + left, affine[3] + top], dtype=torch.float32),
            "gt_xyxy": gt_xyxy.float()}


def canvas_to_original_xyxy(boxes_cxcywh: torch.Tensor, imsize: int, scale: torch.Tensor,
                            pad_offset: torch.Tensor) -> torch.Tensor:
    """(B,4) normalised canvas cxcywh -> (B,4) xyxy original-image pixels, with the samples' (B,2)
    scale and pad_offset. The one inverse mapping (evaluate.py uses it)."""
    corners = box_convert(boxes_cxcywh.float() * imsize, "cxcywh", "xyxy").view(-1, 2, 2)  # (B, corner, xy)
    corners = (corners - pad_offset[:, None].float()) / scale[:, None].float()
    return torch.cat([corners.amin(1), corners.amax(1)], dim=1)  # a flip (sx < 0) swaps x1 and x2


def unnormalise(images: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) ImageNet-normalised canvases -> RGB in [0,1] (padding: the ImageNet mean colour), e.g. for CLIP."""
    return images * IMAGENET_STD.to(images.device) + IMAGENET_MEAN.to(images.device)
