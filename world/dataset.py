"""The synthetic world's scenes as a grounding dataset, and its vocabulary.

    ds = world_dataset(WorldConfig(), "val", tokenizer, train=False, imsize=64, max_query_len=16)  # data.make_dataset

Sample i of a split is scenes.scene(seed, split, i, image_size), drawn and transformed as a real image would be."""

import functools
import os

import torch

import data
from world import scenes
from world.recipe import WorldConfig


def write_vocab(directory: str, words=scenes.WORDS) -> str:
    """Write a word-level BERT vocab.txt ([PAD] = 0, then [UNK] [CLS] [SEP] [MASK], then words: by default every word
    the world says) into directory, so that data.load_tokenizer(directory) works offline; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path + ".partial", "w") as f:  # moved into place whole: a killed write leaves no short vocabulary
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    os.replace(path + ".partial", path)
    return path


class ShapesWorld(data.GroundingDataset):
    """Scene i of a split, drawn and transformed like a real image. Its slices: expressions with a word that the
    grounding data say rarely (scenes.RARE_WORDS), and the others."""

    slices = ("frequent", "rare")

    def __init__(self, split: str, tokenizer, *, train: bool, imsize: int, max_query_len: int, seed: int = 0,
                 size: int | None = None, image_size: int = 128, rare_keep: float = scenes.RARE_KEEP):
        super().__init__("shapes", split, tokenizer, train=train, imsize=imsize, max_query_len=max_query_len)
        self.seed, self.image_size, self.rare_keep = seed, image_size, rare_keep
        self.size = scenes.SPLITS[split][1] if size is None else size

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"shapes {self.split}: index {i} outside [0, {self.size})")
        return scenes.scene(self.seed, self.split, i, self.image_size, self.rare_keep)

    def slice_of(self, i: int) -> int:
        return int(scenes.says_rare(self.scene(i)["text"]))

    def load(self, i: int):
        sc = self.scene(i)
        return scenes.draw(sc), torch.tensor(sc["objects"][0]["box"], dtype=torch.float32), sc["text"]

    def transformed(self, i: int) -> dict:
        if self.train or self.split == "captions":  # the toy CLIP reads each once: a cache would only hold them
            return super().transformed(i)
        if not 0 <= i < self.size:
            raise IndexError(f"shapes {self.split}: index {i} outside [0, {self.size})")
        return dict(_unaugmented(self.seed, self.split, i, self.image_size, self.imsize, self.rare_keep))  # a copy


@functools.lru_cache(maxsize=32768)
def _unaugmented(seed: int, split: str, i: int, image_size: int, imsize: int, rare_keep: float) -> dict:
    """An unaugmented scene's sample never changes, so it is drawn once per process: the recipe reads its train scenes
    twice (the toy DETR, the token cache) and its val and test scenes at every evaluation (~53 kB each at 64 px)."""
    sc = scenes.scene(seed, split, i, image_size, rare_keep)
    box = torch.tensor(sc["objects"][0]["box"], dtype=torch.float32)
    return data.transform_sample(scenes.draw(sc), box, sc["text"].lower(), train=False, imsize=imsize)


def world_dataset(world: WorldConfig | dict | None, split: str, tokenizer, *, train: bool, imsize: int,
                  max_query_len: int) -> ShapesWorld:
    """data.make_dataset's --dataset shapes: `split` with the sizes of the world's settings (a WorldConfig, the dict a
    checkpoint holds, or None for the defaults)."""
    world = WorldConfig(**world) if isinstance(world, dict) else world or WorldConfig()
    return ShapesWorld(split, tokenizer, train=train, imsize=imsize, max_query_len=max_query_len,
                       size=world.size(split), image_size=world.shapes_image_size, rare_keep=world.shapes_rare_keep)
