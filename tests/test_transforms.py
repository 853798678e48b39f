"""transforms.py: the train augmentation and eval letterbox keep box, pixels and text together, and invert exactly.

Run: python -m pytest -q tests/test_transforms.py
"""
import pytest
import torch
from torchvision import tv_tensors

import transforms

S = 96  # a small canvas keeps the transform tests fast


def rect_image(h, w, box, value=255):
    """uint8 (3,h,w): black with a filled rectangle at box (x1, y1, x2, y2), pixel edges."""
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    x1, y1, x2, y2 = box
    img[:, y1:y2, x1:x2] = value
    return img


def check_box_covers_rectangle(sample, imsize):
    """The canvas's bright pixels (the drawn rectangle) and the target box agree within a pixel."""
    img = transforms.unnormalise(sample["image"][None])[0].mean(0)
    real = ~sample["img_is_pad"]
    lo, hi = img[real].min(), img[real].max()
    ys, xs = ((img > (lo + hi) / 2) & real).nonzero(as_tuple=True)
    cx, cy, w, h = (sample["target"] * imsize).tolist()
    pixel_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    target_box = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    assert torch.allclose(pixel_box, target_box, atol=1.01), (pixel_box, target_box)


# -----------------------------------------------------------------------------
# text: the flip's word swap, the crop's position words


@pytest.mark.parametrize("text, swapped", [
    ("left of the bright lamp", "right of the bright lamp"),
    ("the man on the right", "the man on the left"),
    ("leftmost chair", "rightmost chair"),
    ("the left-most chair", "the right-most chair"),
    ("left and right", "right and left"),
    ("the left's wheel", "the right's wheel"),
    ("bright light, cleft, lefty, copyright, lefties", "bright light, cleft, lefty, copyright, lefties"),
    ("top left", "top right"),
    ("the leftside car, the rightside one", "the rightside car, the leftside one"),
    ("lefthand glove", "righthand glove"),
    ("topleft corner, bottomright, upperleft", "topright corner, bottomleft, upperright"),
    ("upper-left, far-right guy", "upper-right, far-left guy"),
    ("rightest man walking leftward", "leftest man walking rightward"),
    ("alright, rightly, leftover, lefthanded", "alright, rightly, leftover, lefthanded"),
    ("", ""),
])
def test_flip_swaps_whole_words_only(text, swapped):
    assert transforms.swap_left_right(text) == swapped
    assert transforms.swap_left_right(swapped) == text


@pytest.mark.parametrize("text, spatial", [
    ("laptop", False), ("the stop sign", False), ("bottomless cup", False), ("brighter", False),
    ("top", True), ("man in the middle", True), ("leftmost", True), ("left-most", True),
    ("topmost box", True), ("the cup above the plate", True), ("bottom right", True),
    ("the leftside car", True), ("topleft", True), ("centre", True), ("lower one", True), ("uppermost", True),
    ("bottomless", False), ("centered", False), ("slower", False),
])
def test_spatial_words_are_whole_words(text, spatial):
    assert transforms.has_spatial_word(text) is spatial


# -----------------------------------------------------------------------------
# transforms


def test_eval_transform_deterministic_and_invertible():
    gt = torch.tensor([13.0, 7.0, 30.0, 29.0])
    for h, w in ((37, 60), (60, 37), (48, 48), (120, 200)):
        img = rect_image(h, w, gt.int().tolist())
        a = transforms.transform_sample(img, gt, "a", train=False, imsize=S)
        b = transforms.transform_sample(img, gt, "a", train=False, imsize=S)
        assert all(torch.equal(a[k], b[k]) for k in a if k != "text")
        rh, rw = round(h * S / max(h, w)), round(w * S / max(h, w))
        assert a["pad_offset"].tolist() == [(S - rw) // 2, (S - rh) // 2]  # centred, as TransVG rounds
        assert (~a["img_is_pad"]).sum() == rh * rw and (a["image"][:, a["img_is_pad"]] == 0).all()
        back = transforms.canvas_to_original_xyxy(a["target"][None], S, a["scale"][None], a["pad_offset"][None])
        assert torch.allclose(back[0], gt, atol=1e-4)
        check_box_covers_rectangle(a, S)


def test_train_transform_keeps_box_on_pixels_and_invertible():
    """Every branch (crop or not, flip or not), on many draws: the box still covers the rectangle,
    lies on the image (never cut out), and the recorded map takes it back to the annotation."""
    flips, crops = 0, {"the left car": 0, "a car": 0}
    for seed in range(60):
        torch.manual_seed(seed)
        h, w = (70, 110) if seed % 2 else (110, 70)
        x1, y1 = int(torch.randint(0, w // 2, ())), int(torch.randint(0, h // 2, ()))
        bw, bh = int(torch.randint(5, w // 2, ())), int(torch.randint(5, h // 2, ()))
        gt = torch.tensor([x1, y1, x1 + bw, y1 + bh], dtype=torch.float32)
        img = rect_image(h, w, gt.int().tolist())
        s = transforms.transform_sample(img, gt, "the left car", train=True, imsize=S)
        s_nospatial = transforms.transform_sample(img, gt, "a car", train=True, imsize=S)
        for smp in (s, s_nospatial):
            check_box_covers_rectangle(smp, S)
            # cropped = the whole original, mapped to the canvas, is wider or taller than what is shown
            shown = (~smp["img_is_pad"]).sum(1).max(), (~smp["img_is_pad"]).sum(0).max()
            crops[smp["text"].replace("right", "left")] += bool(abs(smp["scale"][0]) * w > shown[0] + 0.5 or
                                                                 smp["scale"][1] * h > shown[1] + 0.5)
            back = transforms.canvas_to_original_xyxy(smp["target"][None], S, smp["scale"][None],
                                                smp["pad_offset"][None])
            assert torch.allclose(back[0], gt, atol=1e-3)
        flipped = s["scale"][0] < 0
        flips += int(flipped)
        assert s["text"] == ("the right car" if flipped else "the left car")
    assert 10 < flips < 50
    assert crops["the left car"] == 0 and crops["a car"] > 10  # no crop with spatial words


IDENTITY = (1.0, 1.0, 0.0, 0.0)  # (sx, sy, ox, oy)


def boxes(x1, y1, x2, y2, h, w):
    return tv_tensors.BoundingBoxes(torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), format="XYXY",
                                         canvas_size=(h, w), clamping_mode=None)


def test_crop_always_contains_the_box():
    lo, hi, cropped = 40, 60, 0
    for seed in range(300):
        torch.manual_seed(seed)
        h, w = int(torch.randint(50, 90, ())), int(torch.randint(50, 90, ()))
        x1, y1 = float(torch.rand(())) * w * 0.8, float(torch.rand(())) * h * 0.8
        x2, y2 = x1 + float(torch.rand(())) * (w - x1), y1 + float(torch.rand(())) * (h - y1)
        img = torch.zeros(3, h, w, dtype=torch.uint8)
        out, cbox, aff = transforms._crop_keeping_box(img, boxes(x1, y1, x2, y2, h, w), IDENTITY, lo, hi)
        ch, cw = out.shape[-2:]
        if (ch, cw) == (h, w):  # not cropped: only allowed when no crop in [lo, hi] can hold the box
            assert max(lo, x2 - x1) > min(w, hi) - 1 or max(lo, y2 - y1) > min(h, hi) - 1
            continue
        cropped += 1
        assert lo <= ch <= hi and lo <= cw <= hi
        b = cbox[0]
        assert b[0] >= -1e-3 and b[1] >= -1e-3 and b[2] <= cw + 1e-3 and b[3] <= ch + 1e-3
        shifted = torch.tensor([x1 + aff[2], y1 + aff[3], x2 + aff[2], y2 + aff[3]])
        assert torch.allclose(b, shifted, atol=1e-4)
    assert cropped > 100
    # a box poking out of the image (a bad annotation) is left uncropped, not an error
    out = transforms._crop_keeping_box(torch.zeros(3, 80, 80), boxes(50, 5, 83, 30, 80, 80), IDENTITY, lo, hi)
    assert out[0].shape == (3, 80, 80)


def test_train_sizes_scale_with_imsize():
    torch.manual_seed(0)
    for imsize in (640, 128):
        sides = set()
        for _ in range(40):
            img, gt = torch.zeros(3, 300, 400, dtype=torch.uint8), torch.tensor([10.0, 10.0, 90.0, 90.0])
            s = transforms.transform_sample(img, gt, "left", train=True, imsize=imsize)  # spatial word: no crop
            sides.add(round(400 * abs(float(s["scale"][0]))))
        assert sides <= {round(imsize / 640 * x) for x in range(448, 641, 32)} and len(sides) > 3


def test_unnormalise_inverts_the_canvas_normalisation_and_padding_is_the_mean_colour():
    gt = torch.tensor([2.0, 3.0, 20.0, 30.0])
    img = rect_image(48, S, [2, 3, 20, 30], value=200)  # long side = the canvas: no resize
    s = transforms.transform_sample(img, gt, "a", train=False, imsize=S)
    rgb = transforms.unnormalise(s["image"][None])[0]  # (3,S,S) in [0,1]
    shown = rgb[:, ~s["img_is_pad"]].view(3, 48, S)
    assert torch.allclose(shown * 255, img.float(), atol=1e-3)
    assert torch.allclose(rgb[:, s["img_is_pad"]], transforms.IMAGENET_MEAN.view(3, 1), atol=1e-6)
