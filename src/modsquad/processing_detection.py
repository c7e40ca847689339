"""Detection targets and predictions in the Transformers conventions (COCO annotations in, DETR-style labels out)."""

from __future__ import annotations

from typing import Any

import torch

from .box_ops import xywh_to_cxcywh

# Boxes may overshoot the image by rounding in real annotations; beyond this many pixels they are an error.
BOX_TOLERANCE_PX = 1.0


def prepare_detection_labels(
    annotations: Any, original_sizes: list[tuple[int, int]]
) -> list[dict[str, torch.Tensor]]:
    """COCO-format annotations -> one label dict per image, as Transformers detection models take them.

    Args:
        annotations: one entry per image, either `{"image_id": int, "annotations": [{"bbox": [x, y, w, h],
            "category_id": int, ...}, ...]}` (COCO detection format) or directly the list of objects. Boxes are in
            pixels of the ORIGINAL image.
        original_sizes: `(height, width)` of each original image.

    Returns:
        `list[dict]` with `class_labels` (`torch.LongTensor` of shape `(num_boxes,)`) and `boxes`
        (`torch.FloatTensor` of shape `(num_boxes, 4)`, normalised `(center_x, center_y, width, height)`, which a
        resize leaves unchanged), plus `orig_size`.
    """
    if isinstance(annotations, dict):
        annotations = [annotations]
    if len(annotations) != len(original_sizes):
        raise ValueError(
            f"got {len(annotations)} annotations for {len(original_sizes)} images; give one per image"
        )
    labels = []
    for index, (entry, (height, width)) in enumerate(zip(annotations, original_sizes)):
        objects = entry.get("annotations") if isinstance(entry, dict) else entry
        if objects is None:
            raise ValueError(
                f"annotations[{index}] must be {{'image_id': ..., 'annotations': [{{'bbox': [x, y, w, h], "
                f"'category_id': ...}}]}} or a list of such objects, got {entry!r}"
            )
        boxes, classes = [], []
        for obj in objects:
            if "bbox" not in obj or "category_id" not in obj:
                raise ValueError(
                    f"annotations[{index}]: each object needs 'bbox' and 'category_id', got {obj!r}"
                )
            x, y, w, h = (float(v) for v in obj["bbox"])
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
            x0, y0 = max(x, 0.0), max(y, 0.0)
            x1, y1 = min(x + w, float(width)), min(y + h, float(height))
            boxes.append([x0 / width, y0 / height, (x1 - x0) / width, (y1 - y0) / height])
            classes.append(int(obj["category_id"]))
        box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        labels.append(
            {
                "class_labels": torch.tensor(classes, dtype=torch.long),
                "boxes": xywh_to_cxcywh(box_tensor),
                "orig_size": torch.tensor([height, width]),
            }
        )
    return labels
