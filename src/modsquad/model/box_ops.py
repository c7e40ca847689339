"""Box conversions, areas, overlaps (IoU, GIoU) and non-maximum suppression, in pure torch (no torchvision).

Formats: `xyxy` = `(x_min, y_min, x_max, y_max)`, `cxcywh` = `(center_x, center_y, width, height)` (the Transformers
detection convention, usually normalised to [0, 1]), `xywh` = COCO's `(x_min, y_min, width, height)`.
"""

from __future__ import annotations

import torch


def xywh_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(x_min, y_min, w, h)` -> `(center_x, center_y, w, h)`; shape `(..., 4)`."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x + w / 2, y + h / 2, w, h), dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """`(center_x, center_y, w, h)` -> `(x_min, y_min, x_max, y_max)`; shape `(..., 4)`."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(x_min, y_min, x_max, y_max)` -> `(center_x, center_y, w, h)`; shape `(..., 4)`."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """`(x_min, y_min, x_max, y_max)` -> COCO `(x_min, y_min, w, h)`; shape `(..., 4)`."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of `xyxy` boxes `(..., 4)` -> `(...)`; inverted boxes count as empty."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_union(
    boxes1: torch.Tensor, boxes2: torch.Tensor, pairwise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    area1, area2 = box_area(boxes1), box_area(boxes2)
    if pairwise:
        boxes1, area1 = boxes1[:, None], area1[:, None]
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    intersection = wh[..., 0] * wh[..., 1]
    return intersection, area1 + area2 - intersection


def _enclosing_area(boxes1: torch.Tensor, boxes2: torch.Tensor, pairwise: bool) -> torch.Tensor:
    if pairwise:
        boxes1 = boxes1[:, None]
    top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise intersection over union of `xyxy` boxes.

    Args:
        boxes1 (`torch.Tensor` of shape `(n, 4)`), boxes2 (`torch.Tensor` of shape `(m, 4)`): `xyxy` boxes.
        eps (`float`): keeps the ratio finite for two empty boxes (whose IoU is then 0).

    Returns:
        `torch.Tensor` of shape `(n, m)`.
    """
    intersection, union = _intersection_union(boxes1, boxes2, pairwise=True)
    return intersection / union.clamp(min=eps)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Pairwise generalised IoU (Rezatofighi et al., 2019): IoU minus the share of the enclosing box that the union
    leaves empty; in [-1, 1], and informative (unlike IoU) for boxes that do not overlap.

    Args:
        boxes1 (`torch.Tensor` of shape `(n, 4)`), boxes2 (`torch.Tensor` of shape `(m, 4)`): `xyxy` boxes.

    Returns:
        `torch.Tensor` of shape `(n, m)`.
    """
    intersection, union = _intersection_union(boxes1, boxes2, pairwise=True)
    enclosing = _enclosing_area(boxes1, boxes2, pairwise=True).clamp(min=eps)
    return intersection / union.clamp(min=eps) - (enclosing - union) / enclosing


def aligned_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """Generalised IoU of matched pairs (`boxes1[i]` with `boxes2[i]`), as a loss needs it.

    Args:
        boxes1, boxes2 (`torch.Tensor` of shape `(..., 4)`): `xyxy` boxes of the same shape.

    Returns:
        `torch.Tensor` of shape `(...)`.
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"aligned boxes must have one shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    intersection, union = _intersection_union(boxes1, boxes2, pairwise=False)
    enclosing = _enclosing_area(boxes1, boxes2, pairwise=False).clamp(min=eps)
    return intersection / union.clamp(min=eps) - (enclosing - union) / enclosing


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: keeps the best-scoring box, drops every box overlapping it by more than
    `iou_threshold`, and repeats with the boxes left.

    Args:
        boxes (`torch.Tensor` of shape `(n, 4)`): `xyxy` boxes.
        scores (`torch.Tensor` of shape `(n,)`): their scores.
        iou_threshold (`float`): boxes with an IoU strictly above it with a kept, better box are dropped.

    Returns:
        `torch.LongTensor` of shape `(k,)`: indices of the kept boxes, best score first.
    """
    if boxes.ndim != 2 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:1]:
        raise ValueError(
            f"nms needs boxes (n, 4) and scores (n,), got {tuple(boxes.shape)} and {tuple(scores.shape)}"
        )
    order = scores.argsort(descending=True)
    overlaps = box_iou(boxes[order], boxes[order]) > iou_threshold
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    # The candidates are few (top-k after a score threshold), so a loop over kept boxes is cheap.
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= overlaps[i]
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Non-maximum suppression within each group (e.g. each class): boxes of different groups never suppress
    each other.

    Args:
        boxes (`torch.Tensor` of shape `(n, 4)`): `xyxy` boxes.
        scores (`torch.Tensor` of shape `(n,)`): their scores.
        groups (`torch.LongTensor` of shape `(n,)`): group id of each box.
        iou_threshold (`float`): see [`nms`].

    Returns:
        `torch.LongTensor` of shape `(k,)`: indices of the kept boxes, best score first.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # Shifting each group to its own region of the plane makes boxes of different groups disjoint.
    span = (boxes.max() - boxes.min()).abs() + 1
    shifted = boxes + (groups.to(boxes.dtype) * span)[:, None]
    return nms(shifted, scores, iou_threshold)


__all__ = [
    "aligned_generalized_box_iou",
    "batched_nms",
    "box_area",
    "box_iou",
    "cxcywh_to_xyxy",
    "generalized_box_iou",
    "nms",
    "xywh_to_cxcywh",
    "xyxy_to_cxcywh",
    "xyxy_to_xywh",
]
