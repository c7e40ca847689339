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
    num_labels (`int`, *optional*): number of classes (the Hub `mean_iou` argument); defaults to the constructor's.
    ignore_index (`int`, *optional*): reference value of pixels that are not counted; defaults to the constructor's.
    reduce_labels (`bool`, *optional*): subtract 1 from every reference id and make 0 the ignored value (ADE20K's
        0 = "other"), as the Hub `mean_iou` and Segformer's `do_reduce_labels` do; defaults to the constructor's.
    label_map (`dict[int, int]`, *optional*): reference ids to replace, applied before `reduce_labels`.
    nan_to_num (`float`, *optional*): replaces NaN (undefined) values of the result by this number.

Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`, `per_category_accuracy`
    (`list[float]` of length `num_labels`, NaN for classes absent from both maps).

Example:

    >>> metric = MeanIoU(num_labels=2)
    >>> metric.compute(predictions=[[[0, 1]]], references=[[[0, 0]]])["per_category_iou"]  # class 1: 0 / 1
    [0.5, 0.0]
    >>> # the Hub metric's way: options at compute time
    >>> MeanIoU().compute(predictions=[[[0, 1]]], references=[[[1, 2]]], num_labels=2, reduce_labels=True)["mean_iou"]
    1.0
"""

# The per-class results (lists of `num_labels` values); every other key is a summary over classes.
PER_CATEGORY_KEYS = ("per_category_iou", "per_category_accuracy")
# (reference, prediction) pairs are counted as one uint64 key: each id offset into [0, 2**32).
_OFFSET = np.int64(2**31)
_BITS = np.uint64(32)


class MeanIoU(StreamingMetric):
    """Mean IoU, per-class IoU and pixel accuracy, accumulated as counts of (reference id, predicted id) pixel pairs.

    The options may be given to the constructor (as the package's evaluation does) or to `compute`, as with the Hub's
    `evaluate.load("mean_iou")`; the counts are kept per raw reference id, so options given at `compute` apply to
    every batch added before, exactly as the Hub metric applies them to all its cached maps.

    Args:
        num_labels (`int`, *optional*): number of classes; ids are `0 .. num_labels - 1`. Required here or at
            `compute`.
        ignore_index (`int`, *optional*, defaults to 255): reference value of pixels that are not counted.
        reduce_labels (`bool`, *optional*, defaults to `False`): references use 0 for "other": ids are reduced by 1
            and 0 becomes `ignore_index`'s 255 (Segformer's `do_reduce_labels`).
        label_map (`dict[int, int]`, *optional*): reference ids to replace before `reduce_labels`.
        nan_to_num (`float`, *optional*): replaces NaN values of the result by this number.
        **kwargs: passed to `evaluate.Metric`.
    """

    metric_name = "mean_iou"
    compute_options = ("num_labels", "ignore_index", "reduce_labels", "label_map", "nan_to_num")

    def __init__(
        self,
        num_labels: int | None = None,
        ignore_index: int = 255,
        reduce_labels: bool = False,
        label_map: dict[int, int] | None = None,
        nan_to_num: float | None = None,
        **kwargs,
    ):
        self.options = _check_options(
            {
                "num_labels": num_labels,
                "ignore_index": ignore_index,
                "reduce_labels": reduce_labels,
                "label_map": label_map,
                "nan_to_num": nan_to_num,
            }
        )
        super().__init__(**kwargs)

    @property
    def num_labels(self) -> int | None:
        return self.options["num_labels"]

    @property
    def ignore_index(self) -> int:
        return self.options["ignore_index"]

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
        # pairs[(r, p)] counts the pixels of raw reference id r predicted as class p.
        return {"pairs": {}}

    def _update_state(self, state: dict[str, Any], predictions: list, references: list) -> None:
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
                if array.size and (array.min() < -_OFFSET or array.max() >= _OFFSET):
                    raise ValueError(f"mean_iou example {index}: {name} has ids outside the int32 range")
            pairs = _count_pairs(reference.ravel(), prediction.ravel())
            if self.num_labels is not None:
                # Options known now: report bad ids with the example that holds them.
                _confusion(pairs, self.options, where=f"mean_iou example {index}")
            for key, count in pairs.items():
                state["pairs"][key] = state["pairs"].get(key, 0) + count

    def _compute_from_state(self, state: dict[str, Any], **options) -> dict[str, Any]:
        options = _check_options({**self.options, **options})
        if options["num_labels"] is None:
            raise ValueError("mean_iou needs num_labels: pass it to MeanIoU(...) or to compute(...)")
        confusion = _confusion(state["pairs"], options, where="mean_iou")
        intersection = np.diag(confusion).astype(np.float64)
        reference_area = confusion.sum(axis=1)
        union = reference_area + confusion.sum(axis=0) - intersection
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, intersection / union, np.nan)
            accuracy = np.where(reference_area > 0, intersection / reference_area, np.nan)
        total = reference_area.sum()
        result = {
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "overall_accuracy": float(intersection.sum() / total) if total else float("nan"),
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": accuracy.tolist(),
        }
        if options["nan_to_num"] is not None:
            result = {key: _nan_to_num(value, options["nan_to_num"]) for key, value in result.items()}
        return result


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    num_labels, ignore_index = options["num_labels"], options["ignore_index"]
    if num_labels is not None and (
        not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1
    ):
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    if num_labels is not None and 0 <= ignore_index < num_labels:
        raise ValueError(
            f"ignore_index={ignore_index} is a class id (num_labels={num_labels}); pick a value outside "
            f"[0, {num_labels}), e.g. 255"
        )
    if not isinstance(options["reduce_labels"], bool):
        raise ValueError(f"reduce_labels must be a bool, got {options['reduce_labels']!r}")
    label_map = options["label_map"]
    if label_map is not None and (
        not isinstance(label_map, dict) or not all(_is_int(k) and _is_int(v) for k, v in label_map.items())
    ):
        raise ValueError(f"label_map must map int ids to int ids, got {label_map!r}")
    if options["nan_to_num"] is not None and not isinstance(options["nan_to_num"], (int, float)):
        raise ValueError(f"nan_to_num must be a number or None, got {options['nan_to_num']!r}")
    return options


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _count_pairs(reference: np.ndarray, prediction: np.ndarray) -> dict[tuple[int, int], int]:
    """How many pixels hold each (reference id, predicted id) pair."""
    keys = (reference.astype(np.int64) + _OFFSET).astype(np.uint64) << _BITS
    keys |= (prediction.astype(np.int64) + _OFFSET).astype(np.uint64)
    unique, counts = np.unique(keys, return_counts=True)
    references = (unique >> _BITS).astype(np.int64) - _OFFSET
    predictions = (unique & np.uint64(2**32 - 1)).astype(np.int64) - _OFFSET
    return {(int(r), int(p)): int(c) for r, p, c in zip(references, predictions, counts)}


def _confusion(pairs: dict[tuple[int, int], int], options: dict[str, Any], where: str) -> np.ndarray:
    """The `(num_labels, num_labels)` confusion matrix (rows: reference class) of the counted pairs, after the
    reference ids are mapped as the Hub `mean_iou` maps them (`label_map`, then `reduce_labels`) and the
    `ignore_index` pixels dropped; raises a ValueError naming ids outside `[0, num_labels)`."""
    n, ignore = options["num_labels"], options["ignore_index"]
    label_map = options["label_map"] or {}
    confusion = np.zeros((n, n), dtype=np.int64)
    bad: dict[str, set[int]] = {"reference": set(), "prediction": set()}
    for (reference, prediction), count in pairs.items():
        reference = int(label_map.get(reference, reference))
        if options["reduce_labels"]:
            # The Hub's (and Segformer's) reduction: 0 -> 255, others -1, and what lands on 254 back to 255.
            reference = 255 if reference == 0 else reference - 1
            reference = 255 if reference == 254 else reference
        if reference == ignore:
            continue
        if not 0 <= reference < n:
            bad["reference"].add(reference)
        if not 0 <= prediction < n:
            bad["prediction"].add(prediction)
        if 0 <= reference < n and 0 <= prediction < n:
            confusion[reference, prediction] += count
    for name, ids in bad.items():
        if ids:
            raise ValueError(
                f"{where}: {name} has ids {sorted(ids)[:10]} outside [0, {n}) (ignore_index={ignore} is allowed "
                "in references only)"
            )
    return confusion


def _nan_to_num(value: Any, number: float) -> Any:
    if isinstance(value, list):
        return [number if np.isnan(v) else v for v in value]
    return number if np.isnan(value) else value


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on an all-NaN input; an empty mean is simply undefined here.
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")


__all__ = ["PER_CATEGORY_KEYS", "MeanIoU"]
