"""TransVG's split files: the lists of (image file, box, expression) entries every TransVG-lineage codebase reads
(TransVG, QRNet, CLIP-VG, HiVG), at <split_root>/<folder>/<folder>_<split>.pth (data.split_paths says which).

    items, skipped = read_items(paths, "xywh", flickr=False, drop_invalid=False, what="refcoco val")

An entry is (img_file, _, box, phrase, _), Flickr30k's (img_file, box, phrase); the box is COCO's xywh for the RefCOCO
family and xyxy for ReferIt and Flickr30k. It becomes an item (img_file, int xyxy, phrase) by TransVG's own rules, so
that targets and accuracy match the published numbers; an entry that cannot (malformed, zero area, no word) is an error
listing the first few, or skipped and counted with drop_invalid. The files are read without unpickling anything but
plain data. References: TransVG (github.com/djiajunustc/TransVG @ c862427) datasets/data_loader.py, re-written from a
written description of it (no code copied). This file imports nothing from the project.
"""

import math
import warnings

import torch

from machinery.flags import UsageError

GET_SPLITS = ("Download the TransVG split indices (data.tar, linked from TransVG's GETTING_STARTED.md; QRNet and "
              "CLIP-VG ship the same files) and extract them")


def has_word(text: str) -> bool:
    """False for an expression a tokenizer turns into nothing (or [UNK]s): empty, emoji or punctuation only."""
    return any(ch.isalnum() for ch in text)


def read_split_file(path: str) -> list:
    """A TransVG split file: a list of tuples, read without unpickling anything but plain data."""
    try:
        entries = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or OSError depending on the damage
        raise UsageError(f"cannot read split file {path}: {type(e).__name__}: {e}\n(split files are plain "
                         "lists of tuples; anything more is refused, never unpickled unrestricted)") from e
    if not isinstance(entries, list):
        raise UsageError(f"split file {path} holds a {type(entries).__name__}, expected a list of tuples")
    return entries


def parse_entry(entry, box_format: str, flickr: bool) -> tuple[str, list[int], str]:
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


def read_items(paths: list[str], box_format: str, flickr: bool, drop_invalid: bool, what: str
               ) -> tuple[list[tuple[str, list[int], str]], int]:
    """The items of the split files at paths, in order, and how many invalid entries were skipped (drop_invalid; else
    they are an error listing them). what names the split in messages ("refcoco val")."""
    items, bad = [], []
    for path in paths:
        for k, entry in enumerate(read_split_file(path)):
            try:
                items.append(parse_entry(entry, box_format, flickr))
            except ValueError as e:
                bad.append(f"{path} entry {k}: {e}: {repr(entry)[:200]}")
    if bad and not drop_invalid:
        raise UsageError(f"{len(bad)} invalid entries (--drop_invalid skips them):\n" + "\n".join(bad[:5]))
    if bad:
        warnings.warn(f"{what}: skipped {len(bad)} invalid entries; first {bad[0]}", stacklevel=4)
    if not items:
        raise UsageError(f"{what}: no usable entries in {', '.join(paths)}" +
                         (f" ({len(bad)} invalid, skipped)" if bad else " (the split file is empty)"))
    return items, len(bad)
