"""--cache_visual: a frozen visual branch's tokens and a frozen teacher's targets, computed once per sample.

    train_set = CachedVisual(dataset, model, teacher, widths, device)   # train.py; its batches carry "visual" and
                                                                         # "teacher_targets", which optimizer_step reads

When the student's visual branch is frozen and the images are not augmented, a sample's visual tokens never change,
nor do a frozen teacher's targets for it: computing them once, in eval mode, gives the step exactly what it would
compute itself, and a step then costs BERT and the fusion only. It holds every sample's tokens in memory (RefCOCO's
120,000 expressions at 640 px would need ~50 GB), so it suits small datasets. A trainable teacher's targets change
every step: with one, the canvases are kept and the teacher runs in the step. When it is valid: machinery/preflight.py.
"""

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import data


def freeze_visual(model: torch.nn.Module) -> None:
    """The student's visual branch out of training: no gradients, so train.param_groups leaves it out of the
    optimizer. Its BatchNorm statistics stay still because no training step runs it (CachedVisual feeds the step its
    tokens, computed once in eval mode), not because of anything here."""
    model.visual.requires_grad_(False)


class CachedVisual(Dataset):
    """The samples of `dataset` with their images replaced by what the frozen visual branch makes of them, "visual":
    (tokens (N,D), tokens_is_pad (N,), the last map's top-left cell (C,1,1)), all that GroundingModel.forward(visual=)
    reads, and a frozen teacher's pooled targets, "teacher_targets": (image (Cv,) or None, text (Ct,) or None);
    "image" and "img_is_pad" are None, or, with a trainable teacher, the canvas it still needs."""

    train = False  # its samples are fixed (no augmentation), so runtime.EpochSeeded has nothing to seed

    def __init__(self, dataset: Dataset, model: torch.nn.Module, teacher, widths: tuple, device: torch.device,
                 batch_size: int = 256) -> None:
        live_teacher = teacher is not None and teacher.trainable
        # its own generator: a loader otherwise draws a seed from the global RNG, which a resumed run has just restored
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=data.collate, generator=torch.Generator())
        parts, was_training, self.text = {}, model.training, []
        model.eval()
        with torch.no_grad():
            for batch in tqdm(loader, desc="frozen visual branch: caching its tokens", dynamic_ncols=True):
                images = batch["image"].to(device)
                vis, vis_is_pad, cnn = model.visual(images, batch["img_is_pad"].to(device))
                fields = {"vis": vis, "vis_is_pad": vis_is_pad, "cnn": cnn[:, :, :1, :1],
                          **{k: batch[k] for k in ("input_ids", "attention_mask", "target")}}
                if live_teacher:
                    fields["image"] = batch["image"]
                elif teacher is not None:
                    targets = zip(("teacher_image", "teacher_text"), teacher.targets(data.unnormalise(images),
                                                                                     batch["text"], widths))
                    fields.update({k: v for k, v in targets if v is not None})  # None: a modality not distilled
                for k, v in fields.items():
                    parts.setdefault(k, []).append(v.float().cpu() if v.is_floating_point() else v.cpu())
                self.text += batch["text"]
        model.train(was_training)
        self.fields = {k: torch.cat(v) for k, v in parts.items()}
        self.distilled = teacher is not None and not live_teacher

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict:
        f = {k: v[i] for k, v in self.fields.items()}
        sample = {"image": f.get("image"), "img_is_pad": None, "input_ids": f["input_ids"],
                  "attention_mask": f["attention_mask"], "target": f["target"], "text": self.text[i],
                  "visual": (f["vis"], f["vis_is_pad"], f["cnn"])}
        if self.distilled:
            sample["teacher_targets"] = (f.get("teacher_image"), f.get("teacher_text"))
        return sample
