"""Training targets and losses of the anchor-free (CenterNet / TTFNet-style) detection head.

Each object puts a Gaussian peak on the class heatmap at the cell holding its centre; the box branch learns the
distances from a cell to the four sides of the box at the cells around that centre, weighted by the same Gaussian.
Labels follow the Transformers detection convention: one dict per image with `class_labels` `(n,)` and normalised
`(center_x, center_y, width, height)` `boxes` `(n, 4)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers.image_transforms import center_to_corners_format

from .box_ops import aligned_generalized_box_iou

# Gaussian radius as a share of the box side (TTFNet's alpha): sigma = GAUSSIAN_ALPHA * side / 6.
GAUSSIAN_ALPHA = 0.54
# Slack for float rounding when checking that normalised box corners lie inside the image.
BOX_EPS = 1e-4


def check_detection_labels(
    labels, batch_size: int, num_labels: int, device: torch.device | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validates detection labels and returns `(class_labels, boxes)` per image.

    Args:
        labels (`list[dict]`): one dict per image with `class_labels` (`(n,)` ints in `[0, num_labels)`) and `boxes`
            (`(n, 4)` normalised `(center_x, center_y, width, height)`, inside the image, width and height > 0).
        batch_size (`int`): number of images in the batch.
        num_labels (`int`): number of classes of the task.
        device (`torch.device`, *optional*): where to put the returned tensors.

    Returns:
        `list[tuple[torch.LongTensor, torch.FloatTensor]]`: per image, class ids `(n,)` and cxcywh boxes `(n, 4)`.

    Raises:
        ValueError: naming the image index and the bad value.
    """
    if isinstance(labels, Mapping) or not isinstance(labels, Sequence):
        raise ValueError(
            f"detection labels must be a list with one dict per image ({{'class_labels': (n,), 'boxes': (n, 4)}}), "
            f"got {type(labels).__name__}"
        )
    if len(labels) != batch_size:
        raise ValueError(
            f"got detection labels for {len(labels)} images, but the batch has {batch_size} images"
        )
    checked = []
    for index, target in enumerate(labels):
        if not isinstance(target, Mapping):
            raise ValueError(
                f"labels[{index}] must be a dict with 'class_labels' and 'boxes', got {type(target).__name__}"
            )
        missing = [key for key in ("class_labels", "boxes") if key not in target]
        if missing:
            raise ValueError(f"labels[{index}] lacks {missing}; it has keys {sorted(target)}")
        classes = torch.as_tensor(target["class_labels"], device=device)
        boxes = torch.as_tensor(target["boxes"], device=device, dtype=torch.float32)
        if boxes.numel() == 0 and classes.numel() == 0:
            # An image without objects, possibly given as empty lists (which torch reads as float, shape (0,)).
            classes, boxes = classes.long().reshape(0), boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[-1] != 4:
            raise ValueError(
                f"labels[{index}]['boxes'] must have shape (num_boxes, 4), got {tuple(boxes.shape)}"
            )
        if classes.shape != boxes.shape[:1] or classes.is_floating_point():
            raise ValueError(
                f"labels[{index}]['class_labels'] must be {boxes.shape[0]} integer class ids (one per box), "
                f"got {classes.dtype} of shape {tuple(classes.shape)}"
            )
        bad_class = (classes < 0) | (classes >= num_labels)
        if bad_class.any():
            raise ValueError(
                f"labels[{index}]['class_labels'] holds {classes[bad_class].tolist()}; accepted ids are "
                f"0..{num_labels - 1}"
            )
        if not torch.isfinite(boxes).all():
            raise ValueError(f"labels[{index}]['boxes'] holds non-finite values: {boxes.tolist()}")
        degenerate = (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
        if degenerate.any():
            raise ValueError(
                f"labels[{index}]['boxes'] has degenerate boxes {_rounded(boxes[degenerate])} "
                "(width and height must be > 0)"
            )
        corners = center_to_corners_format(boxes)
        outside = ((corners < -BOX_EPS) | (corners > 1 + BOX_EPS)).any(-1)
        if outside.any():
            raise ValueError(
                f"labels[{index}]['boxes'] has boxes {_rounded(boxes[outside])} outside the image; boxes must be "
                "normalised (center_x, center_y, width, height) with corners in [0, 1]"
            )
        checked.append((classes.long(), boxes))
    return checked


def _rounded(boxes: torch.Tensor) -> list:
    """Boxes as a readable list for error messages (float32 prints 0.9 as 0.8999999761581421)."""
    return [[round(v, 4) for v in box] for box in boxes.tolist()]


def detection_targets(
    classes: torch.Tensor,
    boxes: torch.Tensor,
    num_labels: int,
    map_size: tuple[int, int],
    image_size: tuple[int, int],
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Targets of one image on the `map_size` output grid.

    Args:
        classes (`torch.LongTensor` of shape `(n,)`): class ids.
        boxes (`torch.FloatTensor` of shape `(n, 4)`): normalised cxcywh boxes.
        num_labels (`int`): number of classes.
        map_size (`tuple[int, int]`): `(height, width)` of the output grid.
        image_size (`tuple[int, int]`): `(height, width)` of the input image in pixels.
        stride (`int`): pixels per output cell.

    Returns:
        `heatmap` (`(num_labels, map_h * map_w)`, 1 at each object's centre cell, Gaussian around it),
        `box_targets` (`(map_h * map_w, 4)` normalised xyxy box each cell regresses) and `box_weights`
        (`(map_h * map_w,)`, each object's cells summing to 1; 0 where nothing is regressed).
    """
    map_h, map_w = map_size
    num_cells = map_h * map_w
    device = boxes.device
    heatmap = torch.zeros(num_labels, num_cells, device=device)
    box_targets = torch.zeros(num_cells, 4, device=device)
    box_weights = torch.zeros(num_cells, device=device)
    if len(boxes) == 0:
        return heatmap, box_targets, box_weights

    # Object geometry in output-cell units; cell (i, j) has its centre at ((j + 0.5), (i + 0.5)) * stride pixels.
    scale = boxes.new_tensor([image_size[1] / stride, image_size[0] / stride])
    centers = boxes[:, :2] * scale
    sizes = boxes[:, 2:] * scale
    center_cells = torch.stack(
        (centers[:, 0].floor().clamp(0, map_w - 1), centers[:, 1].floor().clamp(0, map_h - 1)), dim=-1
    )
    sigmas = (sizes * GAUSSIAN_ALPHA / 6).clamp(min=1e-3)
    cols = torch.arange(map_w, device=device, dtype=boxes.dtype)
    rows = torch.arange(map_h, device=device, dtype=boxes.dtype)
    dx = (cols[None, :] - center_cells[:, :1]) / sigmas[:, :1]  # (n, map_w)
    dy = (rows[None, :] - center_cells[:, 1:]) / sigmas[:, 1:]  # (n, map_h)
    gaussian = torch.exp(-0.5 * (dy[:, :, None] ** 2 + dx[:, None, :] ** 2)).reshape(len(boxes), num_cells)
    heatmap.scatter_reduce_(0, classes[:, None].expand(-1, num_cells), gaussian, reduce="amax")

    # A cell regresses the smallest object whose box holds its centre (its own centre cell always counts, so
    # boxes thinner than a cell still get one).
    corners = center_to_corners_format(boxes) * scale.repeat(2)
    cell_x = (cols + 0.5)[None, None, :]
    cell_y = (rows + 0.5)[None, :, None]
    inside = (
        (cell_x > corners[:, 0, None, None])
        & (cell_x < corners[:, 2, None, None])
        & (cell_y > corners[:, 1, None, None])
        & (cell_y < corners[:, 3, None, None])
    ).reshape(len(boxes), num_cells)
    center_index = (center_cells[:, 1] * map_w + center_cells[:, 0]).long()
    inside[torch.arange(len(boxes), device=device), center_index] = True
    areas = (boxes[:, 2] * boxes[:, 3])[:, None].expand(-1, num_cells)
    owner = torch.where(inside, areas, torch.full_like(areas, float("inf"))).argmin(0)
    assigned = inside.any(0)
    weights = torch.where(assigned, gaussian.gather(0, owner[None]).squeeze(0), torch.zeros_like(box_weights))
    per_object = torch.zeros(len(boxes), device=device).index_add_(0, owner, weights)
    box_weights = weights / per_object[owner].clamp(min=1e-12)
    box_targets = center_to_corners_format(boxes)[owner]
    return heatmap, box_targets, box_weights


def heatmap_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet's penalty-reduced pixel-wise focal loss, summed (divide by the number of objects).

    Args:
        logits (`torch.FloatTensor` of any shape): heatmap logits.
        targets (`torch.FloatTensor` of the same shape): Gaussian targets in [0, 1]; exactly 1 at object centres.
        alpha (`float`): focusing exponent on the prediction error.
        beta (`float`): how much cells near a centre are spared as negatives.

    Returns:
        `torch.FloatTensor` scalar: the summed loss.
    """
    positive = targets.eq(1)
    prob = logits.sigmoid()
    # logsigmoid keeps log(p) and log(1 - p) finite where the sigmoid saturates.
    positive_loss = (1 - prob) ** alpha * nn.functional.logsigmoid(logits)
    negative_loss = (1 - targets) ** beta * prob**alpha * nn.functional.logsigmoid(-logits)
    return -torch.where(positive, positive_loss, negative_loss).sum()


def detection_loss(
    heatmap_logits: torch.Tensor,
    pred_boxes_xyxy: torch.Tensor,
    labels,
    stride: int,
    image_size: tuple[int, int],
    heatmap_loss_coef: float,
    box_loss_coef: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Heatmap focal loss plus Gaussian-weighted GIoU loss of a batch.

    Args:
        heatmap_logits (`torch.FloatTensor` of shape `(batch_size, num_labels, map_h, map_w)`): class heatmaps.
        pred_boxes_xyxy (`torch.FloatTensor` of shape `(batch_size, map_h * map_w, 4)`): normalised xyxy box
            predicted at each cell (not clipped, so that the loss keeps its gradient).
        labels (`list[dict]`): Transformers detection labels, one dict per image (see [`check_detection_labels`]).
        stride (`int`): pixels per output cell.
        image_size (`tuple[int, int]`): `(height, width)` of the input images in pixels.
        heatmap_loss_coef, box_loss_coef (`float`): weights of the two terms.

    Returns:
        The weighted total (scalar) and a dict with the unweighted `loss_heatmap` and `loss_giou`.
    """
    batch, num_labels, map_h, map_w = heatmap_logits.shape
    targets = check_detection_labels(labels, batch, num_labels, device=heatmap_logits.device)
    per_image = [
        detection_targets(classes, boxes, num_labels, (map_h, map_w), image_size, stride)
        for classes, boxes in targets
    ]
    heatmaps = torch.stack([t[0] for t in per_image]).view_as(heatmap_logits)
    box_targets = torch.stack([t[1] for t in per_image])
    box_weights = torch.stack([t[2] for t in per_image])
    num_objects = max(sum(len(boxes) for _, boxes in targets), 1)

    loss_heatmap = heatmap_focal_loss(heatmap_logits.float(), heatmaps) / num_objects
    weighted = box_weights > 0
    giou = aligned_generalized_box_iou(pred_boxes_xyxy[weighted].float(), box_targets[weighted])
    loss_giou = ((1 - giou) * box_weights[weighted]).sum() / num_objects
    total = heatmap_loss_coef * loss_heatmap + box_loss_coef * loss_giou
    return total, {"loss_heatmap": loss_heatmap.detach(), "loss_giou": loss_giou.detach()}


__all__ = ["check_detection_labels", "detection_loss", "detection_targets", "heatmap_focal_loss"]
