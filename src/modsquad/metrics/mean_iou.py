"""Mean intersection over union and pixel accuracy of semantic segmentation, from a running confusion matrix."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

from .streaming import StreamingMetric, to_numpy

_DESCRIPTION = """
Semantic segmentation scores over all pixels of all images whose reference is not `ignore_index`:
IoU of class c = |pred = c and ref = c| / |pred = c or ref = c|; accuracy of class c = |pred = c and ref = c| /
|ref = c|; overall (pixel) accuracy = correct pixels / counted pixels. Pixel counts are summed over the whole split
before dividing (as in ADE20K / Cityscapes evaluation), so large images weigh more than small ones. Classes that
never occur in the references nor the predictions have an undefined IoU (NaN) and are left out of the means.
"""

_INPUTS = """
Args:
    predictions (`list` of 2-D int arrays/tensors): predicted class id per pixel, one `(height, width)` map per image.
    references (`list` of 2-D int arrays/tensors/PIL images): reference class ids, same shapes; pixels equal to
        `ignore_index` are not counted.

Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`, `per_category_accuracy`
    (`list[float]` of length `num_labels`, NaN for classes absent from both maps).

Example:

    >>> metric = MeanIoU(num_labels=2)
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 0]]])["per_category_iou"]  # class 1: 0 / 1
    [0.5, 0.0]
"""


class MeanIoU(StreamingMetric):
    """Mean IoU, per-class IoU and pixel accuracy, accumulated as a `(num_labels, num_labels)` confusion matrix.

    Args:
        num_labels (`int`): number of classes; ids are `0 .. num_labels - 1`.
        ignore_index (`int`, *optional*, defaults to 255): reference value of pixels that are not counted.
        **kwargs: passed to `evaluate.Metric`.
    """

    metric_name = "mean_iou"

    def __init__(self, num_labels: int, ignore_index: int = 255, **kwargs):
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        if 0 <= ignore_index < num_labels:
            raise ValueError(
                f"ignore_index={ignore_index} is a class id (num_labels={num_labels}); pick a value outside "
                f"[0, {num_labels}), e.g. 255"
            )
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _init_state(self) -> dict[str, Any]:
        # confusion[r, p] counts the pixels of reference class r predicted as class p.
        return {"confusion": np.zeros((self.num_labels, self.num_labels), dtype=np.int64)}

    def _update_state(self, state: dict[str, Any], predictions: list, references: list) -> None:
        n = self.num_labels
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction, reference = to_numpy(prediction), to_numpy(reference)
            if prediction.ndim != 2 or prediction.shape != reference.shape:
                raise ValueError(
                    f"mean_iou example {index}: prediction {prediction.shape} and reference {reference.shape} must "
                    "be 2-D maps of the same (height, width); post-process predictions to the reference size"
                )
            for name, array in (("prediction", prediction), ("reference", reference)):
                if not np.issubdtype(array.dtype, np.integer):
                    raise ValueError(
                        f"mean_iou example {index}: {name} holds {array.dtype}; class ids are ints"
                    )
            counted = reference != self.ignore_index
            reference, prediction = reference[counted].astype(np.int64), prediction[counted].astype(np.int64)
            for name, array in (("reference", reference), ("prediction", prediction)):
                bad = array[(array < 0) | (array >= n)]
                if bad.size:
                    raise ValueError(
                        f"mean_iou example {index}: {name} has ids {sorted(set(bad.tolist()))[:10]} outside "
                        f"[0, {n}) (ignore_index={self.ignore_index} is allowed in references only)"
                    )
            state["confusion"] += np.bincount(reference * n + prediction, minlength=n * n).reshape(n, n)

    def _compute_from_state(self, state: dict[str, Any]) -> dict[str, Any]:
        confusion = state["confusion"]
        intersection = np.diag(confusion).astype(np.float64)
        reference_area = confusion.sum(axis=1)
        union = reference_area + confusion.sum(axis=0) - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, intersection / union, np.nan)
            accuracy = np.where(reference_area > 0, intersection / reference_area, np.nan)
        total = reference_area.sum()
        return {
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "overall_accuracy": float(intersection.sum() / total) if total else float("nan"),
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": accuracy.tolist(),
        }


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN input; an empty mean is simply undefined here.
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


__all__ = ["MeanIoU"]
