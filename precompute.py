"""What the training step feeds the student, and where the teacher's targets come from: computed from the batch every
step, or, for parts that never change, computed once per sample before the run (--cache_visual).

    feed = OnTheFly(teacher, widths)                                   # the default: any dataset, any student
    feed = Precomputed(dataset, model, teacher, widths, device)        # --cache_visual: a dataset of its own
    out = model(*feed.student_inputs(batch))                           # the step (train.py), either way
    targets = feed.teacher_targets(batch)

When is precomputing valid? When the student's visual branch is frozen (its tokens depend on the image alone: TransVG's
branch, not QRNet's, which reads the expression) and the images are not augmented (each sample is one fixed canvas),
the visual tokens of a sample never change, nor do a frozen teacher's targets for it: computing them once, in eval
mode, gives the step exactly what it would compute itself. A training step then costs BERT and the fusion only: on
the synthetic world (2-core CPU, per sample) ~1.2 ms, against ~4 ms more for the frozen ResNet and ~1.7 ms for drawing
the scene. It holds every sample's tokens in memory (the synthetic world's 10,000 scenes: ~60 MB; RefCOCO's 120,000
expressions at 640 px would need ~50 GB), so it suits small datasets. A trainable teacher's targets change every
step, so with one the canvases are kept instead (~1 GB at 64 px) and the teacher still runs in the step.
train.py freezes the visual branch (freeze_visual) before it builds the optimizer, and wraps the training set after
it has loaded the weights to cache; TrainConfig refuses --cache_visual with --augment, and preflight.py with QRNet.
"""

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import data
import transforms


def freeze_visual(model: torch.nn.Module) -> None:
    """The student's visual branch out of training: no gradients, so train.param_groups leaves it out of the
    optimizer. Its BatchNorm statistics stay still because no training step runs it (Precomputed feeds the step its
    tokens, computed once in eval mode), not because of anything here."""
    model.visual.requires_grad_(False)


class OnTheFly:
    """The default: the batch's canvases go through the student's visual branch and the teacher at every step."""

    def __init__(self, teacher, widths: tuple, channels_last: bool = False) -> None:
        self.teacher, self.widths, self.channels_last = teacher, widths, channels_last

    def student_inputs(self, batch: dict) -> tuple:
        """GroundingModel.forward's arguments: the canvases, their padding, the tokens."""
        images = batch["image"]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, batch["img_is_pad"], batch["input_ids"], batch["attention_mask"]

    def teacher_targets(self, batch: dict) -> tuple:
        """CLIP's [DIE] and [DTE] of the same canvas (its normalisation undone) and the same expression, pooled to the
        student's widths (None for a modality that is not distilled)."""
        return self.teacher.targets(transforms.unnormalise(batch["image"]), batch["text"], self.widths)


class Precomputed(Dataset):
    """A dataset whose images are replaced by what the frozen visual branch makes of them ("vis", "vis_is_pad" and
    the last map's top-left cell "cnn", all that forward(visual=...) reads) and by a frozen teacher's targets
    ("teacher_image", "teacher_text"), computed once, in eval mode; and the feed of its batches (see the file's
    docstring for when it is valid)."""

    def __init__(self, dataset: Dataset, model: torch.nn.Module, teacher, widths: tuple, device: torch.device,
                 batch_size: int = 256) -> None:
        if any(p.requires_grad for p in model.visual.parameters()) or getattr(dataset, "train", False):
            raise ValueError("Precomputed: needs a frozen visual branch (freeze_visual) and unaugmented samples")
        self.teacher, self.widths = teacher, widths
        self.live_teacher = teacher is not None and teacher.trainable
        # its own generator: a loader otherwise draws a seed from the global RNG, which a resumed run has just restored
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=data.collate, generator=torch.Generator())
        keep, parts, was_training = ("input_ids", "attention_mask", "target"), {}, model.training
        self.text = []
        model.eval()
        with torch.no_grad():
            for batch in tqdm(loader, desc="frozen visual branch: caching its tokens", dynamic_ncols=True):
                images = batch["image"].to(device)
                vis, vis_is_pad, cnn = model.visual(images, batch["img_is_pad"].to(device))
                fields = {"vis": vis, "vis_is_pad": vis_is_pad, "cnn": cnn[:, :, :1, :1], **{k: batch[k] for k in keep}}
                if self.live_teacher:
                    fields["image"] = batch["image"]
                elif teacher is not None:
                    image, text = teacher.targets(transforms.unnormalise(images), batch["text"], widths)
                    targets = {"teacher_image": image, "teacher_text": text}  # None: a modality not distilled
                    fields.update({k: v for k, v in targets.items() if v is not None})
                for k, v in fields.items():
                    parts.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
                self.text += batch["text"]
        model.train(was_training)
        self.fields = {k: torch.cat(v) for k, v in parts.items()}

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.fields.items()}, "text": self.text[i]}

    def student_inputs(self, batch: dict) -> tuple:
        """GroundingModel.forward's arguments: no canvas, the tokens, and the visual branch's outputs."""
        return None, None, batch["input_ids"], batch["attention_mask"], (batch["vis"], batch["vis_is_pad"],
                                                                          batch["cnn"])

    def teacher_targets(self, batch: dict) -> tuple:
        """The stored targets; a trainable teacher's are computed now, from the stored canvases."""
        if self.live_teacher:
            return self.teacher.targets(transforms.unnormalise(batch["image"]), batch["text"], self.widths)
        return batch.get("teacher_image"), batch.get("teacher_text")
