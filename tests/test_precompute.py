"""precompute.py: what the training step is fed, computed every step or once per sample, is the same.

Run: python -m pytest -q tests/test_precompute.py
"""
import pytest
import torch

import data
import precompute
import transforms
from clip_teacher import CLIPTeacher
from model import GroundingModel


def test_the_cache_holds_what_the_frozen_branch_and_teacher_would_compute(shapes_tok, tiny_config, tiny_clip_dir):
    mcfg = tiny_config(resnet_stages=3, max_query_len=16)
    model, teacher = GroundingModel(mcfg).train(), CLIPTeacher(tiny_clip_dir, device="cpu")
    scenes = data.ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, size=10, image_size=64)
    precompute.freeze_visual(model)
    cache = precompute.Precomputed(scenes, model, teacher, (32, 32), torch.device("cpu"), batch_size=4)
    assert model.training and len(cache) == 10  # left in the mode it was in
    batch = data.collate([scenes[i] for i in range(10)])
    cached = data.collate([cache[i] for i in range(10)])
    model.eval()
    with torch.no_grad():
        vis, vis_is_pad, cnn = model.visual(batch["image"], batch["img_is_pad"])
        image, text = teacher.targets(transforms.unnormalise(batch["image"]), batch["text"], (32, 32))
        live = precompute.OnTheFly(teacher, (32, 32))
        direct = model(*live.student_inputs(batch))
        via_cache = model(*cache.student_inputs(cached))
    torch.testing.assert_close(cached["vis"], vis)
    assert torch.equal(cached["vis_is_pad"], vis_is_pad) and cached["text"] == batch["text"]
    torch.testing.assert_close(cached["teacher_image"], image)
    torch.testing.assert_close(cached["teacher_text"], text)
    for ours, theirs in zip(cache.teacher_targets(cached), live.teacher_targets(batch)):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(via_cache["pred_boxes"], direct["pred_boxes"])
    for loc in ("loc1", "loc4"):
        torch.testing.assert_close(via_cache["distill"][loc], direct["distill"][loc])


def test_only_a_frozen_branch_on_unaugmented_samples_is_precomputed(shapes_tok, tiny_config):
    model = GroundingModel(tiny_config(max_query_len=16))
    scenes = data.ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, size=4, image_size=64)
    with pytest.raises(ValueError, match="frozen visual branch"):
        precompute.Precomputed(scenes, model, None, (32, 32), torch.device("cpu"))
    precompute.freeze_visual(model)
    augmented = data.ShapesWorld("val", shapes_tok, train=True, imsize=64, max_query_len=16, size=4, image_size=64)
    with pytest.raises(ValueError, match="unaugmented"):
        precompute.Precomputed(augmented, model, None, (32, 32), torch.device("cpu"))
    assert all(not p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))
