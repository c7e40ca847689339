"""COCO mean average precision of object detection (AP@[.5:.95], AP50, AP75, per size, recall), via faster-coco-eval."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from .streaming import StreamingMetric, to_numpy

_DESCRIPTION = """
The COCO detection metrics, computed by faster-coco-eval (a C++ port of pycocotools that gives the same numbers):
average precision at IoU thresholds 0.50:0.05:0.95 (101-point interpolated, averaged over classes that have
reference boxes), at IoU 0.50 and 0.75, for small / medium / large boxes (area < 32^2, < 96^2, >= 96^2 pixels), and
average recall given at most 1, 10 and 100 detections per image. Areas are box areas in the ORIGINAL image's pixels.
As in COCO, only the 100 highest-scoring detections of each class in an image count, and a value that is undefined (no reference
box at all, or none of that size) is -1. Images without reference boxes are evaluated too: their detections are
false positives.
"""

_INPUTS = """
Args:
    predictions (`list[dict]`): one dict per image, as `post_process_object_detection` returns it:
        - `boxes`: `(num_detections, 4)` boxes `(x_min, y_min, x_max, y_max)` in pixels of the original image (or
          in the constructor's `box_format`);
        - `scores`: `(num_detections,)` confidences;
        - `labels`: `(num_detections,)` class ids.
    references (`list[dict]`): one dict per image:
        - `boxes`: `(num_boxes, 4)` reference boxes, `(x_min, y_min, x_max, y_max)` pixels;
        - `labels`: `(num_boxes,)` class ids.
    Lists, NumPy arrays and tensors are all accepted; an image with nothing to report has empty entries.

Returns:
    `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_1`, `mar_10`, `mar_100`, `mar_small`,
    `mar_medium`, `mar_large` (floats in [0, 1], or -1 where undefined).

Example:

    >>> metric = MeanAveragePrecision()
    >>> box = [[10.0, 10.0, 50.0, 40.0]]
    >>> metric.compute(
    ...     predictions=[{"boxes": box, "scores": [0.9], "labels": [3]}], references=[{"boxes": box, "labels": [3]}]
    ... )["map"]
    1.0
"""

# faster-coco-eval's `stats_as_dict` keys (default parameters) -> the names this metric reports.
_STAT_NAMES = {
    "AP_all": "map",
    "AP_50": "map_50",
    "AP_75": "map_75",
    "AP_small": "map_small",
    "AP_medium": "map_medium",
    "AP_large": "map_large",
    "AR_all": "mar_1",
    "AR_second": "mar_10",
    "AR_third": "mar_100",
    "AR_small": "mar_small",
    "AR_medium": "mar_medium",
    "AR_large": "mar_large",
}

_BOXES = datasets.Sequence(datasets.Sequence(datasets.Value("float32"), length=4))
_LABELS = datasets.Sequence(datasets.Value("int64"))


# COCO's value for a metric undefined on the split (no reference box at all, or none of that size).
UNDEFINED = -1.0
# Box layouts accepted, named as torchmetrics' `MeanAveragePrecision(box_format=...)` names them.
BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


class MeanAveragePrecision(StreamingMetric):
    """COCO box mAP. The boxes of the whole split are kept (COCO ranks detections across images); images are not.

    The Hub has no COCO detection metric; the result keys and `box_format` follow torchmetrics'
    `MeanAveragePrecision`, which Transformers' object-detection examples use.

    Args:
        box_format (`str`, *optional*, defaults to `"xyxy"`): layout of the boxes of predictions and references:
            `"xyxy"` (what `post_process_object_detection` returns), `"xywh"` (COCO) or `"cxcywh"`, in pixels.
        num_labels (`int`, *optional*): number of classes of the detector. When given, class ids of references and
            predictions outside `0 .. num_labels - 1` raise a ValueError: a dataset whose category ids the model
            cannot predict would otherwise score an mAP of 0 without a word.
        **kwargs: passed to `evaluate.Metric`.
    """

    metric_name = "mean_average_precision"

    def __init__(self, box_format: str = "xyxy", num_labels: int | None = None, **kwargs):
        if box_format not in BOX_FORMATS:
            raise ValueError(f"box_format={box_format!r}; accepted: {list(BOX_FORMATS)}")
        self.box_format = box_format
        if num_labels is not None and (
            isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1
        ):
            raise ValueError(f"num_labels must be a positive int or None, got {num_labels!r}")
        self.num_labels = num_labels
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin et al., Microsoft COCO: Common Objects in Context, ECCV 2014.",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": {
                        "boxes": _BOXES,
                        "scores": datasets.Sequence(datasets.Value("float32")),
                        "labels": _LABELS,
                    },
                    "references": {"boxes": _BOXES, "labels": _LABELS},
                }
            ),
            reference_urls=["https://cocodataset.org/#detection-eval"],
        )

    def _init_state(self) -> dict[str, Any]:
        return {"predictions": [], "references": []}

    def _update_state(self, state: dict[str, Any], predictions: list, references: list) -> None:
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction = _image_boxes(
                prediction, index, "prediction", ("boxes", "scores", "labels"), self.box_format
            )
            reference = _image_boxes(reference, index, "reference", ("boxes", "labels"), self.box_format)
            if self.num_labels is not None:
                for kind, entry in (("reference", reference), ("prediction", prediction)):
                    labels = entry["labels"]
                    bad = sorted({int(v) for v in labels[(labels < 0) | (labels >= self.num_labels)]})
                    if bad:
                        raise ValueError(
                            f"mean_average_precision {kind} {index}: class ids {bad[:10]} are out of range; the "
                            f"detector has {self.num_labels} classes, ids 0..{self.num_labels - 1} (map the dataset's "
                            "category ids to the model's labels first)"
                        )
            state["predictions"].append(prediction)
            state["references"].append(reference)

    def _compute_from_state(self, state: dict[str, Any]) -> dict[str, float]:
        ground_truth, detections = _to_coco(state["references"], state["predictions"])
        coco_gt = COCO(ground_truth)
        coco_eval = COCOeval_faster(
            coco_gt, coco_gt.loadRes(detections), iouType="bbox", print_function=_silent
        )
        coco_eval.run()
        stats = coco_eval.stats_as_dict
        return {name: float(stats[key]) for key, name in _STAT_NAMES.items()}


def _silent(*args) -> None:
    # faster-coco-eval reports progress through this callback; an evaluation loop prints its own summary.
    return None


def _image_boxes(
    entry: Any, index: int, kind: str, keys: tuple[str, ...], box_format: str = "xyxy"
) -> dict[str, np.ndarray]:
    """One image's `boxes` (as `xyxy`) / `scores` / `labels` as arrays, checked for shape and ordering of corners."""
    if not isinstance(entry, dict) or any(key not in entry for key in keys):
        raise ValueError(
            f"mean_average_precision {kind} {index} must be a dict with keys {list(keys)}, got "
            f"{entry if not isinstance(entry, dict) else sorted(entry)!r}"
        )
    boxes = to_numpy(entry["boxes"]).astype(np.float64).reshape(-1, 4)
    if box_format == "xywh":
        boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
    elif box_format == "cxcywh":
        boxes = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1)
    arrays = {"boxes": boxes}
    for key in keys[1:]:
        arrays[key] = to_numpy(entry[key]).reshape(-1)
        if len(arrays[key]) != len(boxes):
            raise ValueError(
                f"mean_average_precision {kind} {index}: {len(boxes)} boxes but {len(arrays[key])} {key}"
            )
    if not np.isfinite(boxes).all():
        raise ValueError(
            f"mean_average_precision {kind} {index}: boxes must be finite, got "
            f"{boxes[~np.isfinite(boxes).all(axis=1)][:3].tolist()}"
        )
    if len(boxes) and ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
        raise ValueError(
            f"mean_average_precision {kind} {index}: boxes must be (x_min, y_min, x_max, y_max) with max >= min; "
            f"got {boxes[(boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])][:3].tolist()}"
        )
    return arrays


def _to_coco(references: list[dict], predictions: list[dict]) -> tuple[dict, list[dict]]:
    """The split as a COCO ground-truth dataset and a COCO result list (boxes as x, y, w, h)."""
    images, annotations, detections = [], [], []
    categories: set[int] = set()
    for image_id, (reference, prediction) in enumerate(zip(references, predictions)):
        # COCOeval needs no image size for box metrics; every image must be listed so empty ones are evaluated.
        images.append({"id": image_id})
        for box, label in zip(reference["boxes"], reference["labels"]):
            width, height = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCO treats annotation id 0 as "unmatched"
                    "image_id": image_id,
                    "bbox": [box[0], box[1], width, height],
                    "area": width * height,
                    "category_id": int(label),
                    "iscrowd": 0,
                }
            )
            categories.add(int(label))
        for box, score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"]):
            detections.append(
                {
                    "image_id": image_id,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": float(score),
                    "category_id": int(label),
                }
            )
            categories.add(int(label))
    ground_truth = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category} for category in sorted(categories)],
    }
    return ground_truth, detections


__all__ = ["BOX_FORMATS", "UNDEFINED", "MeanAveragePrecision"]
