"""Box maths and the training losses of EpmVG, as pure functions of tensors.

Contents
  box ops        paired_iou_xyxy (elementwise IoU; torchvision only ships the pairwise one)
  box losses     l1_box_loss (TransVG's), smooth_l1_box_loss (the paper's eq. 8), giou_loss; BOX_LOSSES by name
  distillation   distill_loss: eq. 7 of the paper, image/text/both (MODALITIES), with a feature loss of
                 DISTILL_LOSSES by name: cos (the paper's) or l1 (Table 3 #2)
  total          total_loss: eq. 8 = box + lambda * GIoU + distillation, plus a dict of terms to log
A new loss is a function here and its name in BOX_LOSSES or DISTILL_LOSSES: --box_loss / --distill, their checks and
--help take the names from these dicts. References: EpmVG, arXiv 2312.17648, sec. 3.2, eq. 7-8; TransVG
(github.com/djiajunustc/TransVG @ c862427) utils/loss_utils.py (L1 + GIoU, weights 1:1).

Every function casts its inputs to fp32 first: under bf16 autocast the predictions arrive in bf16,
and GIoU on small boxes loses too much precision there. Boxes are (B,4) with B the batch; the box
format is in every name (cxcywh = centre/size, xyxy = corners), normalised to the padded canvas.
This file imports nothing from the project.
"""

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

# -----------------------------------------------------------------------------
# box ops


def paired_iou_xyxy(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes1[i] with boxes2[i]: (N,4) xyxy, (N,4) xyxy -> (N,).

    Grounding has one box per expression, so we want the elementwise IoU, not the diagonal of
    torchvision's pairwise box_iou (N x N work). A zero-area pair gives IoU 0, not NaN.
    """
    boxes1, boxes2 = boxes1.float(), boxes2.float()
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])  # (N,2)
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])  # (N,2)
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)  # (N,)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    union = area1 + area2 - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


# -----------------------------------------------------------------------------
# box losses (pred and target: (B,4) normalised cxcywh)


def l1_box_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """TransVG's L1: |pred - target| summed over the 4 coordinates, averaged over the batch."""
    return (pred_cxcywh.float() - target_cxcywh.float()).abs().sum(dim=1).mean()


def smooth_l1_box_loss(
    pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor, beta: float = 1.0
) -> torch.Tensor:
    """Smooth-L1 (Fast R-CNN) as the paper's eq. 8 writes it; same reduction as l1_box_loss.

    The paper gives no beta; 1.0 is torch's and Fast R-CNN's. On coordinates normalised to [0,1]
    that makes the loss quadratic everywhere (|d| < 1), so the released TransVG code, which the
    paper's baselines reproduce, uses plain L1 instead; we default to L1 too (see total_loss).
    """
    diff = F.smooth_l1_loss(pred_cxcywh.float(), target_cxcywh.float(), beta=beta, reduction="none")
    return diff.sum(dim=1).mean()


BOX_LOSSES = {"l1": l1_box_loss, "smooth_l1": smooth_l1_box_loss}  # --box_loss: (pred, target) cxcywh -> scalar


def giou_loss(pred_cxcywh: torch.Tensor, target_cxcywh: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - GIoU(pred_i, target_i), torchvision's elementwise GIoU loss.

    Finite for degenerate boxes: torchvision adds eps to the union and to the enclosing area, so a
    zero-width target (a crop can produce one in TransVG's pipeline) gives a finite loss and grad.
    eps is 1e-12 rather than torchvision's 1e-7, which biases the loss by 1e-5 for a box covering 1% of
    the canvas; DETR/TransVG use no eps at all (and produce NaN on degenerate boxes).
    """
    pred = box_convert(pred_cxcywh.float(), "cxcywh", "xyxy")
    target = box_convert(target_cxcywh.float(), "cxcywh", "xyxy")
    return generalized_box_iou_loss(pred, target, reduction="mean", eps=1e-12)


# -----------------------------------------------------------------------------
# cross-modal distillation (paper eq. 7)


def cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B,C), (B,C) -> scalar: 1 - cos, the batch mean (eq. 7's loss: it ignores the features' scale)."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def l1_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B,C), (B,C) -> scalar: Table 3 mode #2 only says "L1"; the mean over the C channels and the batch, so the
    term stays on the same O(1) scale as the cosine loss whatever the feature width."""
    return F.l1_loss(student, teacher)


DISTILL_LOSSES = {"cos": cosine_distance, "l1": l1_distance}  # --distill: (student, teacher) (B,C) -> scalar
MODALITIES = ("both", "image", "text")  # --distill_modality: both (eq. 7), image (Table 3 #3), text (Table 3 #4)


def distill_loss(
    student: tuple[torch.Tensor, torch.Tensor],
    teacher: tuple[torch.Tensor, torch.Tensor],
    kind: str = "cos",
    modality: str = "both",
    alpha: float = 1.5,
    beta: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Eq. 7: alpha * L(p'_v^1, P_cv) + beta * L(p'_l^1, P_cl).

    student: (visual (B,Cv), text (B,Ct)) read from the model's out["distill"][location].
    teacher: the CLIP [DIE] and [DTE] embeddings already pooled to widths Cv and Ct (eq. 5-6).
    modality: "both", "image" (Table 3 #3) or "text" (Table 3 #4).
    Returns {"distill_img": ..., "distill_txt": ...} with the weights applied; a term that is
    switched off is absent rather than zero, so the log shows what actually ran. The tensors of a
    switched-off modality are not read and may be None (the teacher then skips that encoder).
    """
    if modality not in MODALITIES or kind not in DISTILL_LOSSES:
        raise ValueError(f"distill_loss: modality in {MODALITIES} and kind in {tuple(DISTILL_LOSSES)}, got "
                         f"{modality!r} and {kind!r}")
    (s_img, s_txt), (t_img, t_txt) = student, teacher
    active = ("image", "text") if modality == "both" else (modality,)
    for name, s, t in (("image", s_img, t_img), ("text", s_txt, t_txt)):
        if name in active and s.shape != t.shape:
            raise ValueError(f"{name} distillation: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    feature_loss, terms = DISTILL_LOSSES[kind], {}
    if modality in ("both", "image"):
        terms["distill_img"] = alpha * feature_loss(s_img.float(), t_img.float())
    if modality in ("both", "text"):
        terms["distill_txt"] = beta * feature_loss(s_txt.float(), t_txt.float())
    return terms


# -----------------------------------------------------------------------------
# total (paper eq. 8)


def total_loss(
    pred_cxcywh: torch.Tensor,
    target_cxcywh: torch.Tensor,
    box_loss: str = "l1",
    giou_weight: float = 1.0,
    distill_terms: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 8: box loss + lambda * GIoU + distillation terms. Returns (total, terms).

    terms holds every summand as a scalar tensor (still in the graph) ("loss_box", "loss_giou", and
    "distill_img"/"distill_txt" when given), for logging; total is their sum.
    """
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be one of {tuple(BOX_LOSSES)}, got {box_loss!r}")
    terms = {"loss_box": BOX_LOSSES[box_loss](pred_cxcywh, target_cxcywh),
             "loss_giou": giou_weight * giou_loss(pred_cxcywh, target_cxcywh)}
    terms.update(distill_terms or {})
    return sum(terms.values()), terms
