"""Detection targets and predictions in the Transformers conventions: COCO annotations in, DETR-style labels out;
model outputs (`logits`, normalised cxcywh `pred_boxes`) in, scored pixel boxes out."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.image_transforms import center_to_corners_format, corners_to_center_format

from .box_ops import batched_nms

# Boxes may overshoot the image by rounding in real annotations; beyond this many pixels they are an error.
BOX_TOLERANCE_PX = 1.0


def prepare_detection_labels(
    annotations: Any,
    original_sizes: list[tuple[int, int]],
    processed_sizes: list[tuple[int, int]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """COCO-format annotations -> one label dict per image, as Transformers' DETR-family processors return them.

    Args:
        annotations: one entry per image, either `{"image_id": int, "annotations": [{"bbox": [x, y, w, h],
            "category_id": int, "area": float, "iscrowd": 0 or 1, ...}, ...]}` (COCO detection format, as DETR's
            processor takes it) or directly the list of objects. Boxes are in pixels of the ORIGINAL image. Objects
            marked `iscrowd: 1` are left out, as DETR leaves them out; `area` defaults to the box area.
        original_sizes: `(height, width)` of each original image.
        processed_sizes: `(height, width)` of each processed image (`size` of the labels, and what `area` is
            scaled to); the original sizes when not given.

    Returns:
        `list[dict]` with `class_labels` (`torch.LongTensor` of shape `(num_boxes,)`), `boxes`
        (`torch.FloatTensor` of shape `(num_boxes, 4)`, normalised `(center_x, center_y, width, height)`, which a
        resize leaves unchanged), `area` (`(num_boxes,)`, pixels of the processed image), `iscrowd` (`(num_boxes,)`,
        zeros), `image_id` (`(1,)`, when given), `orig_size` and `size` (`(2,)` height and width). Boxes are clipped
        to the image; a box that overshoots by less than `BOX_TOLERANCE_PX` and has nothing left inside is
        dropped. `category_id` is used as the class id as it is: map dataset category ids to the model's
        contiguous ids (`label2id`) beforehand.

    Raises:
        ValueError: for a missing key, a degenerate box, a box outside the image or a non-integer category,
            naming the image index and the value.
    """
    if isinstance(annotations, dict):
        annotations = [annotations]
    if len(annotations) != len(original_sizes):
        raise ValueError(
            f"got {len(annotations)} annotations for {len(original_sizes)} images; give one per image"
        )
    processed_sizes = list(processed_sizes or original_sizes)
    labels = []
    for index, (entry, (height, width)) in enumerate(zip(annotations, original_sizes)):
        objects = entry.get("annotations") if isinstance(entry, dict) else entry
        if objects is None:
            raise ValueError(
                f"annotations[{index}] must be {{'image_id': ..., 'annotations': [{{'bbox': [x, y, w, h], "
                f"'category_id': ...}}]}} or a list of such objects, got {entry!r}"
            )
        out_height, out_width = processed_sizes[index]
        area_scale = (out_height * out_width) / (height * width)
        corners, classes, areas = [], [], []
        for obj in objects:
            if "bbox" not in obj or "category_id" not in obj:
                raise ValueError(
                    f"annotations[{index}]: each object needs 'bbox' and 'category_id', got {obj!r}"
                )
            if obj.get("iscrowd", 0) not in (0, 1, False, True):
                raise ValueError(f"annotations[{index}]: iscrowd must be 0 or 1, got {obj['iscrowd']!r}")
            if obj.get("iscrowd", 0):
                continue  # a crowd region, not one object (DETR's processor drops them too)
            x, y, w, h = (float(v) for v in obj["bbox"])
            if not all(math.isfinite(v) for v in (x, y, w, h)):
                raise ValueError(f"annotations[{index}]: box {obj['bbox']} has non-finite coordinates")
            if w <= 0 or h <= 0:
                raise ValueError(
                    f"annotations[{index}]: degenerate box {obj['bbox']} (width and height must be > 0)"
                )
            if (
                x < -BOX_TOLERANCE_PX
                or y < -BOX_TOLERANCE_PX
                or x + w > width + BOX_TOLERANCE_PX
                or (y + h > height + BOX_TOLERANCE_PX)
            ):
                raise ValueError(
                    f"annotations[{index}]: box {obj['bbox']} (COCO x, y, w, h in pixels) lies outside the "
                    f"{width}x{height} image"
                )
            category = _class_id(obj["category_id"])
            if category is None or category < 0:
                raise ValueError(
                    f"annotations[{index}]: category_id must be an integer class id >= 0, got {obj['category_id']!r}"
                )
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(width)), min(y + h, float(height))
            if x1 <= x0 or y1 <= y0:
                # A sliver lying wholly in the tolerated overshoot: nothing of it is in the image.
                continue
            area = float(obj["area"]) if obj.get("area") is not None else (x1 - x0) * (y1 - y0)
            if not area > 0:
                raise ValueError(f"annotations[{index}]: area must be > 0, got {obj['area']!r}")
            corners.append([x0 / width, y0 / height, x1 / width, y1 / height])
            classes.append(category)
            areas.append(area * area_scale)
        label = {
            "class_labels": torch.tensor(classes, dtype=torch.long),
            "boxes": corners_to_center_format(torch.tensor(corners, dtype=torch.float32).reshape(-1, 4)),
            "area": torch.tensor(areas, dtype=torch.float32),
            "iscrowd": torch.zeros(len(classes), dtype=torch.long),
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([out_height, out_width]),
        }
        if isinstance(entry, dict) and entry.get("image_id") is not None:
            label["image_id"] = torch.tensor([int(entry["image_id"])])
        labels.append(label)
    return labels


def _class_id(value: Any) -> int | None:
    """`value` as an int if it is an integer number (Python, NumPy or 0-d tensor), else None."""
    if isinstance(value, (bool, str, bytes)):
        return None
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        return None
    return as_int if as_int == value else None


def heatmap_peak_logits(heatmap: torch.Tensor, kernel: int = 3) -> torch.Tensor:
    """`(batch, num_labels, h, w)` heatmap logits -> `(batch, h * w, num_labels)` logits in which every cell that
    is not the maximum of its `kernel x kernel` neighbourhood (per class) is `-inf` (never a detection)."""
    heatmap = heatmap.detach().float()
    pooled = torch.nn.functional.max_pool2d(heatmap, kernel, stride=1, padding=kernel // 2)
    peaks = heatmap.masked_fill(heatmap < pooled, float("-inf"))
    return peaks.flatten(2).transpose(1, 2)


def post_process_object_detection(
    outputs,
    threshold: float = 0.5,
    target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
    top_k: int = 100,
    nms_threshold: float | None = 0.5,
    peak_kernel: int | None = 3,
) -> list[dict[str, torch.Tensor]]:
    """Model outputs -> scored, labelled boxes per image, as Transformers' DETR-family processors return them.

    Scores are the sigmoid of `logits` (one independent score per class and query). The `top_k` best
    (query, class) pairs of each image are kept, then those scoring above `threshold`, then class-wise
    non-maximum suppression removes the duplicates that neighbouring cells of a dense head predict.

    Args:
        outputs: a model output with `logits` (`(batch_size, num_queries, num_labels)`) and `pred_boxes`
            (`(batch_size, num_queries, 4)`, normalised `(center_x, center_y, width, height)`).
        threshold (`float`, *optional*, defaults to 0.5): keep detections scoring strictly above it.
        target_sizes (`torch.Tensor` of shape `(batch_size, 2)` or `list[tuple[int, int]]`, *optional*):
            `(height, width)` of each image to scale the boxes to; without it, boxes stay normalised.
        top_k (`int`, *optional*, defaults to 100): most detections kept per image.
        nms_threshold (`float`, *optional*, defaults to 0.5): IoU above which a lower-scoring box of the same
            class is dropped; `None` keeps every box.
        peak_kernel (`int`, *optional*, defaults to 3): when `outputs` has a `heatmap` (the class logits on the
            output map, as [`ModSquadForObjectDetection`] returns them), only cells that are the maximum of their
            `peak_kernel x peak_kernel` neighbourhood in a class's heatmap are candidates (CenterNet's peak
            extraction). Without it, the cells around one strong object fill most of the `top_k` slots before NMS
            and the other objects get none (on COCO this cut mAP@50 by about 2.5x). `None` or 1 turns it off.

    Returns:
        `list[dict]`, one per image, best score first: `scores` (`(k,)`), `labels` (`(k,)` class ids) and `boxes`
        (`(k, 4)` as `(x_min, y_min, x_max, y_max)`, in pixels of the target size, or normalised).
    """
    logits, pred_boxes = outputs["logits"], outputs["pred_boxes"]
    if logits.ndim != 3 or pred_boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(
            f"expected logits (batch_size, num_queries, num_labels) and pred_boxes (batch_size, num_queries, 4), "
            f"got {tuple(logits.shape)} and {tuple(pred_boxes.shape)}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    if nms_threshold is not None and not 0 <= nms_threshold <= 1:
        raise ValueError(f"nms_threshold must be in [0, 1] or None, got {nms_threshold!r}")
    if peak_kernel is not None and (
        isinstance(peak_kernel, bool)
        or not isinstance(peak_kernel, int)
        or peak_kernel < 1
        or peak_kernel % 2 == 0
    ):
        raise ValueError(f"peak_kernel must be an odd positive int or None, got {peak_kernel!r}")
    heatmap = outputs.get("heatmap") if hasattr(outputs, "get") else None
    if peak_kernel is not None and peak_kernel > 1 and heatmap is not None:
        logits = heatmap_peak_logits(heatmap, peak_kernel)
        if logits.shape != pred_boxes.shape[:2] + logits.shape[-1:]:
            raise ValueError(
                f"heatmap {tuple(heatmap.shape)} does not match pred_boxes {tuple(pred_boxes.shape)}"
            )
    batch, _, num_labels = logits.shape
    scale = None
    if target_sizes is not None:
        sizes = torch.as_tensor(
            [list(s) for s in target_sizes] if isinstance(target_sizes, (list, tuple)) else target_sizes,
            dtype=torch.float32,
            device=pred_boxes.device,
        )
        if sizes.shape != (batch, 2):
            raise ValueError(
                f"target_sizes must hold one (height, width) per image, i.e. shape ({batch}, 2); "
                f"got shape {tuple(sizes.shape)}"
            )
        scale = sizes.flip(-1).repeat(1, 2)  # (width, height, width, height)

    scores = logits.detach().float().sigmoid().flatten(1)
    k = min(top_k, scores.shape[1])
    top_scores, top_index = scores.topk(k, dim=1)
    results = []
    for image in range(batch):
        keep = top_scores[image] > threshold
        image_scores = top_scores[image][keep]
        labels = top_index[image][keep] % num_labels
        queries = top_index[image][keep] // num_labels
        boxes = center_to_corners_format(pred_boxes[image].detach().float()[queries])
        if nms_threshold is not None:
            kept = batched_nms(boxes, image_scores, labels, nms_threshold)
            image_scores, labels, boxes = image_scores[kept], labels[kept], boxes[kept]
        if scale is not None:
            boxes = boxes * scale[image]
        results.append({"scores": image_scores, "labels": labels, "boxes": boxes})
    return results
