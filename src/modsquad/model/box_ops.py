"""The box operations Transformers does not provide: matched-pair GIoU and non-maximum suppression (pure torch).

Everything else comes from Transformers, which needs no torchvision and so can be imported by remote code:
`transformers.image_transforms.center_to_corners_format` / `corners_to_center_format` convert between
`cxcywh` = `(center_x, center_y, width, height)` and `xyxy` = `(x_min, y_min, x_max, y_max)`, and
`transformers.loss.loss_for_object_detection.box_iou` / `generalized_box_iou` compute pairwise (G)IoU.
"""

from __future__ import annotations

import torch
from transformers.loss.loss_for_object_detection import box_iou


def aligned_generalized_box_iou(
    boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7
) -> torch.Tensor:
    """Generalised IoU (Rezatofighi et al., 2019) of matched pairs, `boxes1[i]` with `boxes2[i]`, as a regression
    loss needs it.

    Transformers' `generalized_box_iou` is pairwise: its diagonal gives the same values, but at `O(n^2)` time and
    memory for the thousands of positive cells of a dense detection batch. This computes the `n` matched values
    directly.

    Args:
        boxes1, boxes2 (`torch.Tensor` of shape `(..., 4)`): `xyxy` boxes of the same shape.
        eps (`float`, *optional*, defaults to 1e-7): keeps the ratios finite for empty boxes.

    Returns:
        `torch.Tensor` of shape `(...)`, in `[-1, 1]`.
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"aligned boxes must have one shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )

    def area(boxes: torch.Tensor) -> torch.Tensor:
        sides = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0)
        return sides[..., 0] * sides[..., 1]

    inner = torch.cat(
        (torch.maximum(boxes1[..., :2], boxes2[..., :2]), torch.minimum(boxes1[..., 2:], boxes2[..., 2:])), -1
    )
    outer = torch.cat(
        (torch.minimum(boxes1[..., :2], boxes2[..., :2]), torch.maximum(boxes1[..., 2:], boxes2[..., 2:])), -1
    )
    intersection = area(inner)
    union = area(boxes1) + area(boxes2) - intersection
    enclosing = area(outer).clamp(min=eps)
    return intersection / union.clamp(min=eps) - (enclosing - union) / enclosing


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression: keeps the best-scoring box, drops every box overlapping it by more than
    `iou_threshold`, and repeats with the boxes left.

    Hand-written because the only library implementation is `torchvision.ops.nms`, which this package does not
    depend on (and remote code must not need).

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
    # Two empty boxes have IoU 0/0 = NaN, which compares False: an empty box suppresses nothing.
    overlaps = box_iou(boxes[order], boxes[order])[0] > iou_threshold
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
    each other. Hand-written for the reason given in [`nms`] (`torchvision.ops.batched_nms` is the library one).

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


__all__ = ["aligned_generalized_box_iou", "batched_nms", "nms"]
