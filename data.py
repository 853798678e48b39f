"""Referring-expression data: the five TransVG benchmarks, their transforms, and a synthetic world.

Contents
  registry     DATASETS: each --dataset name -> TransVG split folder, image folder, splits, box format
  text         whole-word left/right swap and spatial-word test, load_tokenizer, make_encoder, tokenize
  transforms   train (random resize / box-keeping crop / jitter / flip+swap / translate) and eval
               (long side to imsize, centred pad), canvas_to_original_xyxy (the one inverse), collate
  datasets     TransVGSplits (the split files every TransVG-lineage codebase ships), ShapesWorld (shapes.py's
               synthetic referring-expression world: the toy default and the test fixture), make_dataset,
               write_shapes_vocab

References: TransVG (github.com/djiajunustc/TransVG @ c862427) datasets/data_loader.py and
datasets/transforms.py, re-written from a written description of them (no code copied).

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
Box convention: pixel edges, x in [0, W]; pixel i covers [i, i+1). A flip maps x to W - x (TransVG's).
"""

import math
import os
import re
import warnings
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.ops import box_convert

import shapes

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
_GREY = torch.tensor([0.299, 0.587, 0.114])  # PIL's RGB -> "L" weights

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


_COCO, _COCO_IMAGES = "other/images/mscoco/images/train2014", "COCO train2014 images (cocodataset.org)"
_UNC, _UNC_EVAL = ("train", "val", "trainval", "testA", "testB"), ("val", "testA", "testB")
_TVT, _VT = ("train", "val", "test"), ("val", "test")
DATASETS = {
    "refcoco": DatasetInfo("unc", _COCO, _UNC, _UNC_EVAL, "xywh", 20, _COCO_IMAGES),
    "refcoco+": DatasetInfo("unc+", _COCO, _UNC, _UNC_EVAL, "xywh", 20, _COCO_IMAGES),
    "refcocog": DatasetInfo("gref_umd", _COCO, _TVT, _VT, "xywh", 40, _COCO_IMAGES),
    "refcocog_google": DatasetInfo("gref", _COCO, ("train", "val"), ("val",), "xywh", 40, _COCO_IMAGES),
    "referit": DatasetInfo("referit", "referit/images", (*_TVT, "trainval"), _VT, "xyxy", 20,
                           "ReferItGame (SAIAPR TC-12) images"),
    "flickr30k": DatasetInfo("flickr", "Flickr30k/flickr30k_images", _TVT, _VT, "xyxy", 20,
                             "Flickr30k images"),
    "shapes": DatasetInfo("", "", _TVT, _VT, "xyxy", 20, "nothing: it is generated"),
}

# -----------------------------------------------------------------------------
# text

# Whole words only (TransVG replaces substrings: "bright" -> "bleft", and "laptop" counts as "top").
# "-most" forms are one word ("leftmost"); "left-most" splits at the hyphen, so both get swapped.
_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most)?\b)")
# TransVG's five words, plus above/below: a crop can cut out the object they point at.
_SPATIAL = re.compile(r"\b(?:left|right|top|bottom|middle)(?:most)?\b|\b(?:above|below)\b")


def swap_left_right(text: str) -> str:
    """Swap the whole words left <-> right (also leftmost, left-most): the text side of a flip."""
    return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", text)


def has_spatial_word(text: str) -> bool:
    """True if a crop could make the expression wrong (position words, matched as whole words)."""
    return _SPATIAL.search(text) is not None


def load_tokenizer(name_or_path: str):
    """A transformers BERT tokenizer from a hub name or a local folder holding vocab.txt."""
    from transformers import BertTokenizer  # imported here: importing data.py stays cheap

    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.exists(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"tokenizer folder {name_or_path!r} does not exist (it needs a vocab.txt)")
    try:
        tok = BertTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise OSError(f"cannot load the BERT tokenizer {name_or_path!r} ({e}). Offline, pass a local folder "
                      "that holds its vocab.txt") from e
    # transformers 5 offline (HF_HUB_OFFLINE=1) returns a tokenizer with only its 5 special tokens for a
    # hub name it cannot fetch, which would silently map every word to [UNK].
    if len(tok) <= len(tok.all_special_tokens):
        raise OSError(f"BERT tokenizer {name_or_path!r} came back without a vocabulary (hub offline or "
                      "not cached?): pass a local folder that holds its vocab.txt")
    return tok


def make_encoder(tokenizer, max_query_len: int):
    """A private copy of the tokenizer's `tokenizers` backend that adds [CLS]/[SEP], truncates and pads
    to max_query_len. Calling it directly skips transformers' per-call Python, which costs more than the
    encoding itself (~0.2 ms a sample, a tenth of the eval pipeline); same ids (tests check)."""
    from tokenizers import Tokenizer

    if not hasattr(tokenizer, "backend_tokenizer"):
        raise TypeError(f"need a `tokenizers`-backed transformers tokenizer, not {type(tokenizer).__name__}")
    if max_query_len < 2:
        raise ValueError(f"max_query_len must leave room for [CLS] and [SEP], got {max_query_len}")
    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.enable_truncation(max_length=max_query_len)
    encoder.enable_padding(length=max_query_len, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    return encoder


def tokenize(encoder, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] wordpieces [SEP] [PAD]... -> input_ids, attention_mask, both (L,) int64."""
    enc = encoder.encode(text)
    return torch.tensor(enc.ids), torch.tensor(enc.attention_mask)


# -----------------------------------------------------------------------------
# transforms

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


def collate(samples: list[dict]) -> dict:
    """Stack each tensor field to (B, ...); "text" becomes a list of B strings."""
    return {k: [s[k] for s in samples] if k == "text" else torch.stack([s[k] for s in samples])
            for k in samples[0]}


# -----------------------------------------------------------------------------
# datasets


class GroundingDataset(torch.utils.data.Dataset):
    """Shared __getitem__: subclasses give __len__ and load(i) -> (uint8 (3,H,W), box (4,) xyxy, text)."""

    def __init__(self, name: str, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int):
        self.name, self.split, self.train, self.imsize = name, split, train, imsize
        self.encoder = make_encoder(tokenizer, max_query_len)

    def original_image(self, i: int) -> torch.Tensor:
        """The untransformed image of sample i, uint8 (3,H,W)."""
        return self.load(i)[0].contiguous()

    def __getitem__(self, i: int) -> dict:
        image, gt_xyxy, text = self.load(i)
        sample = transform_sample(image, gt_xyxy, text.lower(), train=self.train, imsize=self.imsize)
        sample["input_ids"], sample["attention_mask"] = tokenize(self.encoder, sample["text"])
        sample["index"] = torch.tensor(i)
        return sample


def _read_split_file(path: str) -> list:
    """A TransVG split file: a list of tuples, read without unpickling anything but plain data."""
    try:
        entries = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or OSError depending on the damage
        raise ValueError(f"cannot read split file {path}: {type(e).__name__}: {e}\n(split files are plain "
                         "lists of tuples; anything more is refused, never unpickled unrestricted)") from e
    if not isinstance(entries, list):
        raise ValueError(f"split file {path} holds a {type(entries).__name__}, expected a list of tuples")
    return entries


def _parse_entry(entry, box_format: str, flickr: bool) -> tuple[str, list[int], str]:
    """(img_file, _, box, phrase, _), flickr's (img_file, box, phrase) -> (img_file, int xyxy, phrase)."""
    if not isinstance(entry, (tuple, list)) or len(entry) != (3 if flickr else 5):
        raise ValueError("expected a 3-tuple (img_file, box, phrase)" if flickr else
                         "expected a 5-tuple (img_file, _, box, phrase, _)")
    img_file, box, text = entry if flickr else (entry[0], entry[2], entry[3])
    if not isinstance(img_file, str) or not isinstance(text, str):
        raise ValueError("img_file and phrase must be strings")
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and
            all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        raise ValueError(f"box must be 4 finite numbers, got {box!r}")
    # int() truncates like TransVG's np.array(bbox, dtype=int), before the xywh -> xyxy conversion, so
    # targets and accuracy match the published numbers.
    x1, y1, a, b = (int(v) for v in box)
    xyxy = [x1, y1, x1 + a, y1 + b] if box_format == "xywh" else [x1, y1, a, b]
    if xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
        raise ValueError(f"zero-area box {xyxy} (xyxy after int truncation of {box!r})")
    if not text.strip():
        raise ValueError("empty expression")
    return img_file, xyxy, text


class TransVGSplits(GroundingDataset):
    """One benchmark split, read from the split files TransVG, QRNet, CLIP-VG and HiVG all use.

    Invalid entries (malformed tuple, zero-area box, empty expression) are an error listing them;
    drop_invalid=True skips them instead, with a warning that says how many."""

    def __init__(self, name: str, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int,
                 split_root: str, data_root: str, drop_invalid: bool = False):
        super().__init__(name, split, tokenizer, train=train, imsize=imsize, max_query_len=max_query_len)
        info = DATASETS[name]
        folder = os.path.join(split_root, info.folder)
        # trainval = train + val, except for referit, which ships a trainval file of its own
        parts = ["train", "val"] if split == "trainval" and name != "referit" else [split]
        paths = [os.path.join(folder, f"{info.folder}_{p}.pth") for p in parts]
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{name}: split file {path} not found. Download the TransVG split indices (data.tar, "
                    f"linked from TransVG's GETTING_STARTED.md; QRNet and CLIP-VG ship the same files) and "
                    f"extract them so that {folder}/ exists, or pass --split_root")
        self.image_dir = os.path.join(data_root, info.image_dir)
        self.items, bad = [], []
        for path in paths:
            for k, entry in enumerate(_read_split_file(path)):
                try:
                    self.items.append(_parse_entry(entry, info.box_format, flickr=name == "flickr30k"))
                except ValueError as e:
                    bad.append(f"{path} entry {k}: {e}: {repr(entry)[:200]}")
        if bad and not drop_invalid:
            raise ValueError(f"{len(bad)} invalid entries (drop_invalid=True skips them):\n" +
                             "\n".join(bad[:5]))
        if bad:
            warnings.warn(f"{name} {split}: skipped {len(bad)} invalid entries; first {bad[0]}", stacklevel=3)
        if self.items and not os.path.isabs(self.items[0][0]) and not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"{name}: image folder {self.image_dir} not found: put the "
                                    f"{info.images_from} there, or pass --data_root")

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


# -----------------------------------------------------------------------------
# the synthetic world (shapes.py) as a dataset

def write_vocab(directory: str, words) -> str:
    """Write a word-level BERT vocab.txt ([PAD] = 0, then [UNK] [CLS] [SEP] [MASK], then words) into directory,
    so that load_tokenizer(directory) works offline; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return path


def write_shapes_vocab(directory: str) -> str:
    """Write a BERT vocab.txt with every word the synthetic world says; returns its path."""
    return write_vocab(directory, shapes.WORDS)


class ShapesWorld(GroundingDataset):
    """shapes.py's synthetic referring-expression world as a dataset: sample i of a split is
    shapes.scene(seed, split, i, image_size), drawn and put through the same transforms as a real image."""

    def __init__(self, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int, seed: int = 0,
                 size: int | None = None, image_size: int = 128):
        super().__init__("shapes", split, tokenizer, train=train, imsize=imsize, max_query_len=max_query_len)
        self.seed, self.image_size = seed, image_size
        self.size = shapes.SPLITS[split][1] if size is None else size

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"shapes {self.split}: index {i} outside [0, {self.size})")
        return shapes.scene(self.seed, self.split, i, self.image_size)

    def load(self, i: int):
        sc = self.scene(i)
        return shapes.draw(sc), torch.tensor(sc["objects"][0]["box"], dtype=torch.float32), sc["text"]


def make_dataset(name: str, split: str, tokenizer, *, train: bool, imsize: int = 640, max_query_len: int = 20,
                 split_root: str = "data", data_root: str = "ln_data", seed: int = 0, size: int | None = None,
                 image_size: int = 128, drop_invalid: bool = False) -> GroundingDataset:
    """The dataset `name` (a DATASETS key), split `split`. TransVG uses max_query_len 40 for RefCOCOg
    (DATASETS[name].max_query_len). seed, size (samples; default 20000 train, 1000 val/test) and
    image_size (long side of its images) are for shapes only; drop_invalid for the real ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if split not in DATASETS[name].splits:
        raise ValueError(f"{name} has no split {split!r}; valid: {', '.join(DATASETS[name].splits)}")
    common = dict(train=train, imsize=imsize, max_query_len=max_query_len)
    if name == "shapes":
        return ShapesWorld(split, tokenizer, seed=seed, size=size, image_size=image_size, **common)
    return TransVGSplits(name, split, tokenizer, split_root=split_root, data_root=data_root,
                         drop_invalid=drop_invalid, **common)
