"""Losses on hand-made boxes and vectors, checked against arithmetic done by hand.

Run: python -m pytest -q tests/test_losses.py
"""
import math

import pytest
import torch

from losses import distill_loss, giou_loss, l1_box_loss, paired_iou_xyxy, smooth_l1_box_loss, total_loss


def cxcywh(x1, y1, x2, y2, s=0.1):
    """A box given in xyxy 'units' as normalised cxcywh (unit = s of the canvas)."""
    return [s * (x1 + x2) / 2, s * (y1 + y2) / 2, s * (x2 - x1), s * (y2 - y1)]


def test_identical_boxes_give_zero_loss():
    b = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.1, 0.1]])
    total, terms = total_loss(b, b.clone())
    assert total.item() == pytest.approx(0.0, abs=1e-6)
    assert set(terms) == {"loss_box", "loss_giou"}


def test_giou_overlapping_squares_by_hand():
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, hull 9 -> GIoU = 1/7 - 2/9 = -5/63
    pred = torch.tensor([cxcywh(0, 0, 2, 2)])
    tgt = torch.tensor([cxcywh(1, 1, 3, 3)])
    assert giou_loss(pred, tgt).item() == pytest.approx(1 + 5 / 63, rel=1e-5)


def test_giou_disjoint_boxes_by_hand():
    # [0,0,1,1] vs [2,0,3,1]: IoU 0, union 2, hull 3 -> GIoU = -1/3, loss 4/3
    pred = torch.tensor([cxcywh(0, 0, 1, 1)])
    tgt = torch.tensor([cxcywh(2, 0, 3, 1)])
    assert giou_loss(pred, tgt).item() == pytest.approx(4 / 3, rel=1e-5)


def test_giou_is_batch_mean_and_box_inside_box():
    # inner [1,1,2,2] in outer [0,0,3,3]: IoU = 1/9, hull = outer -> GIoU = 1/9, loss 8/9
    pred = torch.tensor([cxcywh(1, 1, 2, 2), cxcywh(0, 0, 1, 1)])
    tgt = torch.tensor([cxcywh(0, 0, 3, 3), cxcywh(0, 0, 1, 1)])
    assert giou_loss(pred, tgt).item() == pytest.approx((8 / 9 + 0) / 2, rel=1e-5)


def test_l1_sums_coordinates_and_averages_batch():
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]])
    tgt = torch.tensor([[0.6, 0.4, 0.5, 0.7], [0.1, 0.1, 0.1, 0.1]])
    # sample 0: 0.1+0.1+0+0.2 = 0.4; sample 1: 0.4 -> mean 0.4
    assert l1_box_loss(pred, tgt).item() == pytest.approx(0.4, rel=1e-5)
    # smooth-L1 with beta=1 and |d| < 1 is 0.5 d^2: sample 0 = 0.5*(0.01+0.01+0.04) = 0.03, sample 1 = 0.02
    assert smooth_l1_box_loss(pred, tgt).item() == pytest.approx(0.025, rel=1e-5)
    total, terms = total_loss(pred, tgt, box_loss="smooth_l1")
    assert terms["loss_box"].item() == pytest.approx(0.025, rel=1e-5)


def test_degenerate_target_gives_finite_loss_and_grad():
    pred = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.2, 0.2, 0.0, 0.0]], requires_grad=True)
    tgt = torch.tensor([[0.5, 0.5, 0.0, 0.2], [0.2, 0.2, 0.0, 0.0]])  # zero width; zero area
    total, _ = total_loss(pred, tgt)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(pred.grad).all()


def test_losses_run_in_fp32_for_bf16_inputs():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=torch.bfloat16)
    total, terms = total_loss(pred, pred.float() + 0.01)
    assert total.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())


def test_paired_iou_by_hand_and_against_pairwise():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    iou = paired_iou_xyxy(a, b)
    assert iou.tolist() == pytest.approx([1 / 7, 0.0, 0.0])
    from torchvision.ops import box_iou
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 2, generator=g)
    p = torch.cat([x, x + torch.rand(16, 2, generator=g)], 1)
    y = torch.rand(16, 2, generator=g)
    q = torch.cat([y, y + torch.rand(16, 2, generator=g)], 1)
    assert torch.allclose(paired_iou_xyxy(p, q), box_iou(p, q).diagonal(), atol=1e-6)


# -----------------------------------------------------------------------------
# distillation (eq. 7)


def test_distill_cosine_identical_is_zero_and_orthogonal_is_alpha_plus_beta():
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    same = distill_loss((v, t), (3 * v, 0.5 * t))  # cosine ignores scale
    assert sum(same.values()).item() == pytest.approx(0.0, abs=1e-6)
    ortho = distill_loss((v, t), (t, v), alpha=1.5, beta=2.0)
    assert ortho["distill_img"].item() == pytest.approx(1.5)
    assert ortho["distill_txt"].item() == pytest.approx(2.0)


def test_distill_l1_and_modalities():
    s = (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]]))
    t = (torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 3.0]]))
    terms = distill_loss(s, t, kind="l1", alpha=1.0, beta=1.0)
    assert terms["distill_img"].item() == pytest.approx(1.5)  # mean(|1|, |2|)
    assert terms["distill_txt"].item() == pytest.approx(2.0)
    assert set(distill_loss(s, t, modality="image")) == {"distill_img"}
    assert set(distill_loss(s, t, modality="text")) == {"distill_txt"}
    # the switched-off modality is not read, so the teacher can skip that encoder
    assert distill_loss(s, (t[0], None), kind="l1", modality="image", alpha=1.0)["distill_img"].item() == 1.5
    assert distill_loss(s, (None, t[1]), kind="l1", modality="text", beta=1.0)["distill_txt"].item() == 2.0
    total, terms = total_loss(torch.full((1, 4), 0.5), torch.full((1, 4), 0.5),
                              distill_terms=distill_loss(s, t, kind="l1", alpha=1.0, beta=1.0))
    assert total.item() == pytest.approx(3.5, rel=1e-5)


def test_distill_rejects_bad_settings_and_shapes():
    s = (torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="modality"):
        distill_loss(s, s, modality="video")
    with pytest.raises(ValueError, match="kind"):
        distill_loss(s, s, kind="kl")
    with pytest.raises(ValueError, match="text distillation"):
        distill_loss(s, (torch.zeros(2, 4), torch.zeros(2, 8)))


def test_distill_cosine_gradient_is_finite_and_scale_invariant():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 8, generator=g, requires_grad=True)
    t = torch.randn(4, 8, generator=g)
    a = distill_loss((s, s), (t, t))
    b = distill_loss((s, s), (10 * t, 10 * t))
    assert math.isclose(sum(a.values()).item(), sum(b.values()).item(), rel_tol=1e-5)
    sum(a.values()).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
