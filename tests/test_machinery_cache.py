"""machinery/cache.py: what --cache_visual feeds the step, computed once per sample, is what the step would compute.

Run: python -m pytest -q tests/test_machinery_cache.py
(When it is allowed: tests/test_machinery_preflight.py; a cached run resumed bit-exactly: tests/test_train.py.)
"""
import torch

import data
from clip_teacher import CLIPTeacher
from machinery.cache import CachedVisual, freeze_visual
from model import GroundingModel
from world.dataset import ShapesWorld


def test_the_cache_holds_what_the_frozen_branch_and_teacher_would_compute(shapes_tok, tiny_config, tiny_clip_dir):
    mcfg = tiny_config(resnet_stages=3, max_query_len=16)
    model, teacher = GroundingModel(mcfg).train(), CLIPTeacher(tiny_clip_dir, device="cpu")
    scenes = ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, size=10, image_size=64)
    freeze_visual(model)
    assert all(not p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))
    cache = CachedVisual(scenes, model, teacher, (32, 32), torch.device("cpu"), batch_size=4)
    assert model.training and len(cache) == 10  # left in the mode it was in
    batch = data.collate([scenes[i] for i in range(10)])
    cached = data.collate([cache[i] for i in range(10)])
    assert cached["image"] is None and cached["text"] == batch["text"]
    model.eval()
    with torch.no_grad():
        vis, vis_is_pad, _ = model.visual(batch["image"], batch["img_is_pad"])
        targets = teacher.targets(data.unnormalise(batch["image"]), batch["text"], (32, 32))
        direct = model(batch["image"], batch["img_is_pad"], batch["input_ids"], batch["attention_mask"])
        via_cache = model(cached["image"], cached["img_is_pad"], cached["input_ids"], cached["attention_mask"],
                          cached["visual"])
    torch.testing.assert_close(cached["visual"][0], vis)
    assert torch.equal(cached["visual"][1], vis_is_pad)
    for ours, theirs in zip(cached["teacher_targets"], targets):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(via_cache["pred_boxes"], direct["pred_boxes"])
    for loc in ("loc1", "loc4"):
        torch.testing.assert_close(via_cache["distill"][loc], direct["distill"][loc])


def test_a_trainable_teacher_keeps_the_canvas_and_a_text_only_one_the_text_target(shapes_tok, tiny_config,
                                                                                  tiny_clip_dir):
    model = GroundingModel(tiny_config(resnet_stages=3, max_query_len=16))
    freeze_visual(model)
    scenes = ShapesWorld("val", shapes_tok, train=False, imsize=64, max_query_len=16, size=4, image_size=64)
    live = CachedVisual(scenes, model, CLIPTeacher(tiny_clip_dir, device="cpu", trainable=True), (32, 32), "cpu")
    assert "teacher_targets" not in live[0] and torch.equal(live[0]["image"], scenes[0]["image"])
    text_only = CachedVisual(scenes, model, CLIPTeacher(tiny_clip_dir, device="cpu"), (None, 32), "cpu")
    image, text = text_only[0]["teacher_targets"]
    assert image is None and text.shape == (32,)
