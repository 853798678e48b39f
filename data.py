"""Referring-expression data: the five TransVG benchmarks, the synthetic world, and what each sample holds.

Contents
  registry     DATASETS (each --dataset: split folder, image folder, splits, box format, DETR init); DataConfig;
               missing_inputs: the split files and image folder a run would not find, said before it starts
  text         load_tokenizer (BERT's, by hub name or folder), make_encoder, tokenize, write_vocab, collate
  datasets     TransVGSplits (the split files every TransVG-lineage codebase ships), ShapesWorld (shapes.py's
               synthetic world: the laptop default and the test fixture), make_dataset, read_image
Each sample goes through transforms.transform_sample (augmentation, letterbox) and is then tokenised.

References: TransVG (github.com/djiajunustc/TransVG @ c862427) datasets/data_loader.py, re-written from a written
description of it (no code copied).

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
Box convention (transforms.py): pixel edges, x in [0, W]; pixel i covers [i, i+1).
"""

import functools
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as F
from torchvision.io import ImageReadMode, decode_image, read_file

import shapes
from flags import UsageError, check_fields
from transforms import transform_sample

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
    "shapes": DatasetInfo("", "", _TVT, _VT, "xyxy", 20, "nothing: it is generated", ""),
}


@dataclass
class DataConfig:
    dataset: str = "shapes"  # refcoco, refcoco+, refcocog, refcocog_google, referit, flickr30k, shapes (synthetic)
    split_root: str = "data"  # TransVG split files: <split_root>/<unc|unc+|gref|gref_umd|referit|flickr>/
    data_root: str = "ln_data"  # images in TransVG's ln_data/ layout
    drop_invalid: bool = False  # skip split-file entries with an empty expression or a zero-area box (warns)
    shapes_train_size: int = 0  # shapes: generated training scenes (0 = shapes.py's default)
    shapes_eval_size: int = 0  # shapes: scenes per val/test split (0 = shapes.py's default)
    shapes_image_size: int = 128  # shapes: long side of the generated images, pixels
    shapes_rare_keep: float = shapes.RARE_KEEP  # shapes: how often the train split may say a rare word (1 = as val)
    blind_text: bool = False  # the text-blind baseline: every expression becomes "" after the transform
    toy_teacher_steps: int = 600  # shapes: training steps of the toy CLIP, built on first use (world.py, toy.py)
    toy_detr_steps: int = 600  # shapes: training steps of the toy DETR (QRNet: the toy Swin), built on first use

    def __post_init__(self) -> None:
        check_fields(self, [("dataset", self.dataset in DATASETS, f"one of {', '.join(DATASETS)}"),
                            *[(k, getattr(self, k) >= 0, ">= 0") for k in (
                                "shapes_train_size", "shapes_eval_size", "toy_teacher_steps", "toy_detr_steps")],
                            ("shapes_image_size", self.shapes_image_size >= 32, ">= 32 pixels"),
                            ("shapes_rare_keep", 0 <= self.shapes_rare_keep <= 1, "in [0, 1]")])

    def shapes_size(self, split: str) -> int:
        """Scenes in the synthetic world's `split`: --shapes_train_size for train, --shapes_eval_size for any other,
        shapes.SPLITS's size where the flag is 0."""
        return (self.shapes_train_size if split == "train" else self.shapes_eval_size) or shapes.SPLITS[split][1]


GET_SPLITS = ("Download the TransVG split indices (data.tar, linked from TransVG's GETTING_STARTED.md; QRNet and "
              "CLIP-VG ship the same files) and extract them")


def split_paths(name: str, split: str, split_root: str) -> list[str]:
    """The TransVG split files a split reads: trainval = train + val, except for referit, which ships its own."""
    folder = DATASETS[name].folder
    parts = ["train", "val"] if split == "trainval" and name != "referit" else [split]
    return [os.path.join(split_root, folder, f"{folder}_{p}.pth") for p in parts]


def missing_inputs(cfg: DataConfig, splits) -> list[str]:
    """What a run on these splits of cfg.dataset would not find, each with the flag that says where and what to
    do (the README's download steps): split files, then the image folder. Reads nothing, except, when the image
    folder is missing, the first split file's first entry (split files may name images by absolute paths)."""
    if cfg.dataset == "shapes":
        return []
    info = DATASETS[cfg.dataset]
    paths = list(dict.fromkeys(p for split in splits for p in split_paths(cfg.dataset, split, cfg.split_root)))
    found, problems = [p for p in paths if os.path.isfile(p)], []
    if len(found) < len(paths):
        problems.append(f"--split_root {cfg.split_root}: {', '.join(p for p in paths if p not in found)} not found. "
                        f"{GET_SPLITS} into {cfg.split_root}/ (so that "
                        f"{os.path.join(cfg.split_root, info.folder)}/ exists), or pass --split_root")
    image_dir = os.path.join(cfg.data_root, info.image_dir)
    if not os.path.isdir(image_dir):
        try:
            first = _read_split_file(found[0])[0][0] if found else ""
        except (UsageError, IndexError, TypeError, KeyError):  # a broken file: its own error comes when it is read
            first = ""
        if not os.path.isabs(str(first)):
            problems.append(f"--data_root {cfg.data_root}: image folder {image_dir} not found: put the "
                            f"{info.images_from} there, or pass --data_root")
    return problems


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
    encoding itself (~0.2 ms a sample, a tenth of the eval pipeline); same ids (tests check)."""
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


def write_vocab(directory: str, words) -> str:
    """Write a word-level BERT vocab.txt ([PAD] = 0, then [UNK] [CLS] [SEP] [MASK], then words) into directory,
    so that load_tokenizer(directory) works offline; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path + ".partial", "w") as f:  # moved into place whole: a killed write leaves no short vocabulary
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    os.replace(path + ".partial", path)
    return path


def collate(samples: list[dict]) -> dict:
    """Stack each tensor field to (B, ...); "text" becomes a list of B strings."""
    return {k: [s[k] for s in samples] if k == "text" else torch.stack([s[k] for s in samples])
            for k in samples[0]}


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


def _read_split_file(path: str) -> list:
    """A TransVG split file: a list of tuples, read without unpickling anything but plain data."""
    try:
        entries = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or OSError depending on the damage
        raise UsageError(f"cannot read split file {path}: {type(e).__name__}: {e}\n(split files are plain "
                         "lists of tuples; anything more is refused, never unpickled unrestricted)") from e
    if not isinstance(entries, list):
        raise UsageError(f"split file {path} holds a {type(entries).__name__}, expected a list of tuples")
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
    if not has_word(text):
        raise ValueError("empty expression" if not text.strip() else "expression without a word (no letter or digit)")
    return img_file, xyxy, text


def has_word(text: str) -> bool:
    """False for an expression a tokenizer turns into nothing (or [UNK]s): empty, emoji or punctuation only."""
    return any(ch.isalnum() for ch in text)


class TransVGSplits(GroundingDataset):
    """One benchmark split, read from the split files TransVG, QRNet, CLIP-VG and HiVG all use.

    Invalid entries (malformed tuple, zero-area box, empty expression) are an error listing them;
    drop_invalid=True skips them instead, with a warning that says how many."""

    def __init__(self, name: str, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int,
                 split_root: str, data_root: str, drop_invalid: bool = False):
        super().__init__(name, split, tokenizer, train=train, imsize=imsize, max_query_len=max_query_len)
        info = DATASETS[name]
        paths = split_paths(name, split, split_root)
        for path in paths:
            if not os.path.isfile(path):
                raise UsageError(f"{name}: split file {path} not found. {GET_SPLITS} so that "
                                 f"{os.path.dirname(path)}/ exists, or pass --split_root")
        self.image_dir = os.path.join(data_root, info.image_dir)
        self.items, bad = [], []
        for path in paths:
            for k, entry in enumerate(_read_split_file(path)):
                try:
                    self.items.append(_parse_entry(entry, info.box_format, flickr=name == "flickr30k"))
                except ValueError as e:
                    bad.append(f"{path} entry {k}: {e}: {repr(entry)[:200]}")
        if bad and not drop_invalid:
            raise UsageError(f"{len(bad)} invalid entries (--drop_invalid skips them):\n" + "\n".join(bad[:5]))
        if bad:
            warnings.warn(f"{name} {split}: skipped {len(bad)} invalid entries; first {bad[0]}", stacklevel=3)
        self.skipped = len(bad)  # reported beside the accuracy: it is over the entries that remain
        if not self.items:
            raise UsageError(f"{name} {split}: no usable entries in {', '.join(paths)}" +
                             (f" ({len(bad)} invalid, skipped)" if bad else " (the split file is empty)"))
        if not os.path.isabs(self.items[0][0]) and not os.path.isdir(self.image_dir):
            raise UsageError(f"{name}: image folder {self.image_dir} not found: put the {info.images_from} there, "
                             f"or pass --data_root")

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

def write_shapes_vocab(directory: str) -> str:
    """Write a BERT vocab.txt with every word the synthetic world says; returns its path."""
    return write_vocab(directory, shapes.WORDS)


class ShapesWorld(GroundingDataset):
    """shapes.py's synthetic referring-expression world as a dataset: sample i of a split is
    shapes.scene(seed, split, i, image_size), drawn and put through the same transforms as a real image. Its
    slices: expressions with a word that the grounding data say rarely (shapes.RARE_WORDS), and the others."""

    slices = ("frequent", "rare")

    def __init__(self, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int, seed: int = 0,
                 size: int | None = None, image_size: int = 128, rare_keep: float = shapes.RARE_KEEP):
        super().__init__("shapes", split, tokenizer, train=train, imsize=imsize, max_query_len=max_query_len)
        self.seed, self.image_size, self.rare_keep = seed, image_size, rare_keep
        self.size = shapes.SPLITS[split][1] if size is None else size

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"shapes {self.split}: index {i} outside [0, {self.size})")
        return shapes.scene(self.seed, self.split, i, self.image_size, self.rare_keep)

    def slice_of(self, i: int) -> int:
        return int(shapes.says_rare(self.scene(i)["text"]))

    def load(self, i: int):
        sc = self.scene(i)
        return shapes.draw(sc), torch.tensor(sc["objects"][0]["box"], dtype=torch.float32), sc["text"]

    def transformed(self, i: int) -> dict:
        if self.train or self.split == "captions":  # the toy CLIP reads each once: a cache would only hold them
            return super().transformed(i)
        if not 0 <= i < self.size:
            raise IndexError(f"shapes {self.split}: index {i} outside [0, {self.size})")
        return dict(_unaugmented(self.seed, self.split, i, self.image_size, self.imsize, self.rare_keep))  # a copy


@functools.lru_cache(maxsize=32768)
def _unaugmented(seed: int, split: str, i: int, image_size: int, imsize: int, rare_keep: float) -> dict:
    """An unaugmented scene's sample never changes, so it is drawn once per process. The synthetic world's preset
    reads its train scenes twice (the toy DETR's pretraining, train.py's token cache) and its val and test scenes at
    every evaluation (the toy CLIP learns on scenes of the captions split instead, 38,400 of them, each once: not
    cached, ShapesWorld.transformed): its 12,000 at 64 px keep ~0.6 GB (~53 kB each) and save ~1.7 ms a read."""
    sc = shapes.scene(seed, split, i, image_size, rare_keep)
    box = torch.tensor(sc["objects"][0]["box"], dtype=torch.float32)
    return transform_sample(shapes.draw(sc), box, sc["text"].lower(), train=False, imsize=imsize)


def make_dataset(cfg: DataConfig, split: str, tokenizer, *, train: bool, imsize: int = 640,
                 max_query_len: int = 20) -> GroundingDataset:
    """Split `split` of the dataset cfg.dataset (a DATASETS key), with the train transform if train, for a model
    with an imsize canvas and max_query_len tokens (TransVG uses 40 for RefCOCOg: DATASETS[name].max_query_len)."""
    name = cfg.dataset
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if split not in DATASETS[name].splits:
        raise UsageError(f"{name} has no split {split!r}; valid: {', '.join(DATASETS[name].splits)}")
    common = dict(train=train, imsize=imsize, max_query_len=max_query_len)
    if name == "shapes":
        ds = ShapesWorld(split, tokenizer, size=cfg.shapes_size(split), image_size=cfg.shapes_image_size,
                         rare_keep=cfg.shapes_rare_keep, **common)
    else:
        ds = TransVGSplits(name, split, tokenizer, split_root=cfg.split_root, data_root=cfg.data_root,
                           drop_invalid=cfg.drop_invalid, **common)
    ds.blind_text = cfg.blind_text
    return ds
