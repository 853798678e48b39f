"""Referring-expression data: the five benchmarks, what a sample holds, and how an image becomes the model's canvas.

    ds = make_dataset(DataConfig("refcoco"), "val", tokenizer, train=False, imsize=640, max_query_len=20)
    batch = collate([ds[0], ds[1]])

Contents
  registry      DATASETS (each --dataset: split folder, image folder, splits, box format, DETR init), DataConfig
  augmentation  transform_sample: TransVG's train augmentation (scale, a crop that keeps the box, colour jitter, a flip
                that swaps the whole words left/right, translation) or the eval letterbox; its exact inverse
                canvas_to_original_xyxy; unnormalise (what CLIP is given); IMAGENET_MEAN / _STD, defined once
  text          load_tokenizer (BERT's, by hub name or folder), make_encoder, tokenize, collate
  datasets      Benchmark (a split's items, from annotations/), read_image, make_dataset (the synthetic world:
                world/dataset.py, reached only for --dataset shapes)
References: TransVG (github.com/djiajunustc/TransVG @ c862427) datasets/data_loader.py and transforms.py, re-written
from a written description of them (no code copied).

Sample schema: every dataset's __getitem__ returns a dict (S = imsize, L = max_query_len):
  image          float32 (3,S,S)  ImageNet-normalised canvas; 0 (= the ImageNet mean colour) on padding
  img_is_pad     bool    (S,S)    True = padding
  input_ids      int64   (L,)     [CLS] tokens [SEP], then [PAD] = 0
  attention_mask int64   (L,)     1 = real token ([CLS]/[SEP] included)
  target         float32 (4,)     the box as normalised cxcywh on the canvas (the training target)
  text           str              lower-cased expression after the flip's left/right swap (CLIP input)
  orig_size      int64   (2,)     (H, W) of the original image
  scale          float32 (2,)     (sx, sy) and pad_offset (2,) (ox, oy): canvas = original * s + o per
  pad_offset     float32 (2,)       axis. Eval: s = resized/original pixels, o = (left, top) of the
                                    resized image on the canvas. Train also folds in the crop (o can be
                                    < 0) and the flip (sx < 0), so the map stays exact for every sample.
  gt_xyxy        float32 (4,)     the annotation in original-image pixels (after TransVG's int truncation)
  index          int64   ()       position of the sample in its dataset
Box convention: pixel edges, x in [0, W]; pixel i covers [i, i+1); a flip maps x to W - x (TransVG's).
"""

import math
import os
import re
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.ops import box_convert

from annotations import transvg_splits
from annotations.transvg_splits import has_word  # noqa: F401 (data.has_word: the rule evaluate.py's --text follows)
from machinery.flags import UsageError, check_fields

# -----------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class DatasetInfo:
    folder: str  # TransVG split folder under split_root, also the split-file prefix
    image_dir: str  # image folder under data_root (TransVG's ln_data layout)
    splits: tuple[str, ...]  # valid split names
    eval_splits: tuple[str, ...]  # the splits papers report
    box_format: str  # "xyxy" or "xywh" (COCO top-left + size) in the split files
    max_query_len: int  # tokens incl. [CLS]/[SEP] that TransVG uses for it
    images_from: str  # what to download into image_dir
    detr: str  # TransVG's DETR initialisation for it: checkpoints/detr-r50-<detr>.pth (COCO minus its val/test)


_COCO, _COCO_IMAGES = "other/images/mscoco/images/train2014", "COCO train2014 images (cocodataset.org)"
_UNC, _UNC_EVAL = ("train", "val", "trainval", "testA", "testB"), ("val", "testA", "testB")
_TVT, _VT = ("train", "val", "test"), ("val", "test")
DATASETS = {
    "refcoco": DatasetInfo("unc", _COCO, _UNC, _UNC_EVAL, "xywh", 20, _COCO_IMAGES, "unc"),
    "refcoco+": DatasetInfo("unc+", _COCO, _UNC, _UNC_EVAL, "xywh", 20, _COCO_IMAGES, "unc"),
    "refcocog": DatasetInfo("gref_umd", _COCO, _TVT, _VT, "xywh", 40, _COCO_IMAGES, "gref"),
    "refcocog_google": DatasetInfo("gref", _COCO, ("train", "val"), ("val",), "xywh", 40, _COCO_IMAGES, "gref"),
    "referit": DatasetInfo("referit", "referit/images", (*_TVT, "trainval"), _VT, "xyxy", 20,
                           "ReferItGame (SAIAPR TC-12) images", "referit"),
    "flickr30k": DatasetInfo("flickr", "Flickr30k/flickr30k_images", _TVT, _VT, "xyxy", 20,
                             "Flickr30k images", "referit"),  # TransVG issue #16: Flickr starts from ReferIt's
    "shapes": DatasetInfo("", "", _TVT, _VT, "xyxy", 20, "nothing: it is generated", ""),  # world/dataset.py
}


@dataclass
class DataConfig:
    dataset: str = "shapes"  # a benchmark, or shapes: the synthetic world (its own flags: world/recipe.py)
    split_root: str = "data"  # TransVG split files: <split_root>/<unc|unc+|gref|gref_umd|referit|flickr>/
    data_root: str = "ln_data"  # images in TransVG's ln_data/ layout
    drop_invalid: bool = False  # skip split-file entries with an empty expression or a zero-area box (warns)
    blind_text: bool = False  # the text-blind baseline: every expression becomes "" after the transform

    CHOICES = {"dataset": tuple(DATASETS)}

    def __post_init__(self) -> None:
        check_fields(self)


def split_paths(name: str, split: str, split_root: str) -> list[str]:
    """The TransVG split files a split reads: trainval = train + val, except for referit, which ships its own."""
    folder = DATASETS[name].folder
    parts = ["train", "val"] if split == "trainval" and name != "referit" else [split]
    return [os.path.join(split_root, folder, f"{folder}_{p}.pth") for p in parts]


def check_split(name: str, split: str, flag: str = "--split") -> None:
    """A split the dataset has, or a UsageError naming the flag that asked for it and the valid ones."""
    if split not in DATASETS[name].splits:
        raise UsageError(f"{flag} {split}: {name} has no such split; valid: {', '.join(DATASETS[name].splits)}")


# -----------------------------------------------------------------------------
# augmentation: image, box and text together (randomness from torch's global RNG; train.py seeds it per sample)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_GREY = torch.tensor([0.299, 0.587, 0.114])  # PIL's RGB -> "L" weights

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
    [0.6, 1.4], then clipped (PIL ImageEnhance's maths). Hand-written, in place on the canvas view: v2.ColorJitter
    allocates a new image per step, several times slower (docs/transvg.md has the data pipeline's benchmark)."""
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
    normalised; and img_is_pad (S,S). Hand-written because it is the hot loop: in place on the canvas view,
    where v2.ToDtype + v2.Normalize + v2.Pad each allocate an image."""
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
    """uint8 image (3,H,W), box (4,) xyxy original pixels, lower-cased text -> the sample minus tokens. Train: TransVG's
    --aug_crop --aug_scale --aug_translate (blur off, as in its commands); eval: long side to imsize, centred."""
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
    offset = torch.tensor([affine[2] + left, affine[3] + top], dtype=torch.float32)
    return {"image": canvas, "img_is_pad": img_is_pad, "target": target, "text": text, "gt_xyxy": gt_xyxy.float(),
            "orig_size": torch.tensor([orig_h, orig_w]), "scale": torch.tensor(affine[:2]), "pad_offset": offset}


def canvas_to_original_xyxy(boxes_cxcywh: torch.Tensor, imsize: int, scale: torch.Tensor,
                            pad_offset: torch.Tensor) -> torch.Tensor:
    """(B,4) normalised canvas cxcywh -> (B,4) xyxy original-image pixels, with the samples' (B,2) scale and pad_offset:
    the one inverse of transform_sample (evaluate.py uses it)."""
    corners = box_convert(boxes_cxcywh.float() * imsize, "cxcywh", "xyxy").view(-1, 2, 2)  # (B, corner, xy)
    corners = (corners - pad_offset[:, None].float()) / scale[:, None].float()
    return torch.cat([corners.amin(1), corners.amax(1)], dim=1)  # a flip (sx < 0) swaps x1 and x2


def unnormalise(images: torch.Tensor) -> torch.Tensor:
    """(B,3,S,S) ImageNet-normalised canvases -> RGB in [0,1] (padding: the ImageNet mean colour), e.g. for CLIP."""
    return images * IMAGENET_STD.to(images.device) + IMAGENET_MEAN.to(images.device)

# -----------------------------------------------------------------------------
# text


def load_tokenizer(name_or_path: str):
    """A transformers BERT tokenizer from a hub name or a local folder holding vocab.txt."""
    from transformers import BertTokenizer  # imported here: importing data.py stays cheap

    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise UsageError(f"tokenizer folder {name_or_path!r} does not exist (it needs a vocab.txt)")
    try:
        tok = BertTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise UsageError(f"cannot load the BERT tokenizer {name_or_path!r} ({e}). Offline, pass a local folder "
                         "that holds its vocab.txt") from e
    # transformers 5 offline (HF_HUB_OFFLINE=1) returns a tokenizer with only its 5 special tokens for a
    # hub name it cannot fetch, which would silently map every word to [UNK].
    if len(tok) <= len(tok.all_special_tokens):
        raise UsageError(f"BERT tokenizer {name_or_path!r} came back without a vocabulary (hub offline or "
                         "not cached?): pass a local folder that holds its vocab.txt")
    return tok


def make_encoder(tokenizer, max_query_len: int):
    """A private copy of the tokenizer's `tokenizers` backend that adds [CLS]/[SEP], truncates and pads
    to max_query_len. Calling it directly skips transformers' per-call Python, which costs more than the
    encoding itself; the same ids (tests check)."""
    from tokenizers import Tokenizer

    if not hasattr(tokenizer, "backend_tokenizer"):
        raise TypeError(f"need a `tokenizers`-backed transformers tokenizer, not {type(tokenizer).__name__}")
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.enable_truncation(max_length=max_query_len)
    encoder.enable_padding(length=max_query_len, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    return encoder


def tokenize(encoder, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] wordpieces [SEP] [PAD]... -> input_ids, attention_mask, both (L,) int64."""
    enc = encoder.encode(text)
    return torch.tensor(enc.ids), torch.tensor(enc.attention_mask)


def collate(samples: list[dict]) -> dict:
    """A batch of samples: each tensor field stacked to (B, ...), "text" a list of B strings; a tuple field (a cached
    visual branch's outputs, a teacher's targets) stacked element by element, None kept as None."""
    def stack(values: list):
        if values[0] is None:
            return None
        if isinstance(values[0], tuple):
            return tuple(stack(list(v)) for v in zip(*values))
        return torch.stack(values) if torch.is_tensor(values[0]) else values
    return {k: stack([s[k] for s in samples]) for k in samples[0]}


# -----------------------------------------------------------------------------
# datasets


class GroundingDataset(torch.utils.data.Dataset):
    """Shared __getitem__: subclasses give __len__ and load(i) -> (uint8 (3,H,W), box (4,) xyxy, text)."""

    skipped = 0  # invalid entries left out (--drop_invalid)
    slices: tuple[str, ...] = ()  # parts evaluate() also scores apart; a dataset with some has slice_of(i) -> index
    blind_text = False  # DataConfig.blind_text: the model sees the image (and its augmentation) but no word

    def __init__(self, name: str, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int):
        self.name, self.split, self.train, self.imsize = name, split, train, imsize
        self.encoder = make_encoder(tokenizer, max_query_len)

    def original_image(self, i: int) -> torch.Tensor:
        """The untransformed image of sample i, uint8 (3,H,W)."""
        return self.load(i)[0].contiguous()

    def transformed(self, i: int) -> dict:
        """Sample i through the train or eval transform, before tokenisation."""
        image, gt_xyxy, text = self.load(i)
        return transform_sample(image, gt_xyxy, text.lower(), train=self.train, imsize=self.imsize)

    def __getitem__(self, i: int) -> dict:
        sample = self.transformed(i)
        if self.blind_text:  # after the transform, so the augmentation is the one the expression would get
            sample["text"] = ""
        sample["input_ids"], sample["attention_mask"] = tokenize(self.encoder, sample["text"])
        sample["index"] = torch.tensor(i)
        return sample


class Benchmark(GroundingDataset):
    """One split of a benchmark: the (image file, int xyxy box, expression) items its annotations hold (annotations/,
    where invalid entries are refused or, with drop_invalid, skipped and counted), each image under data_root's
    folder for the dataset. Missing files are said before a run starts (machinery/preflight.missing_inputs)."""

    def __init__(self, name: str, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int,
                 split_root: str, data_root: str, drop_invalid: bool = False):
        super().__init__(name, split, tokenizer, train=train, imsize=imsize, max_query_len=max_query_len)
        info = DATASETS[name]
        self.image_dir = os.path.join(data_root, info.image_dir)
        self.items, self.skipped = transvg_splits.read_items(
            split_paths(name, split, split_root), info.box_format, name == "flickr30k", drop_invalid, f"{name} {split}")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, i: int):
        img_file, xyxy, text = self.items[i]
        image = read_image(os.path.join(self.image_dir, img_file), f"{self.name} {self.split} entry {i}: ")
        return image, torch.tensor(xyxy, dtype=torch.float32), text


def read_image(path: str, where: str = "") -> torch.Tensor:
    """uint8 (3,H,W) RGB from an image file; errors name the file (and `where`, e.g. the dataset entry)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}image {path} not found")
    try:
        # RGB whatever the file holds (grayscale, CMYK, palette, RGBA: alpha dropped, like PIL's
        # convert("RGB")). EXIF orientation is ignored, as TransVG's PIL loading does: the COCO, Flickr
        # and ReferIt boxes were drawn on the stored pixels.
        image = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise RuntimeError(f"{where}cannot decode image {path}: {e}") from e
    if image.dtype != torch.uint8:  # 16-bit PNG: scaled to 8 bits (PIL's convert("RGB") would clip)
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


def make_dataset(cfg: DataConfig, split: str, tokenizer, *, train: bool, imsize: int = 640,
                 max_query_len: int = 20, world=None) -> GroundingDataset:
    """Split `split` of the dataset cfg.dataset (a DATASETS key), with the train transform if train, for a model
    with an imsize canvas and max_query_len tokens (TransVG uses 40 for RefCOCOg: DATASETS[name].max_query_len).
    world: the synthetic world's settings (world.recipe.WorldConfig) for --dataset shapes (None: its defaults)."""
    name = cfg.dataset
    check_split(name, split)
    common = dict(train=train, imsize=imsize, max_query_len=max_query_len)
    if name == "shapes":  # the synthetic world, only when it is asked for
        from world.dataset import world_dataset
        ds = world_dataset(world, split, tokenizer, **common)
    else:
        ds = Benchmark(name, split, tokenizer, split_root=cfg.split_root, data_root=cfg.data_root,
                       drop_invalid=cfg.drop_invalid, **common)
    ds.blind_text = cfg.blind_text
    return ds
