"""Depth estimation errors (AbsRel, RMSE, delta < 1.25^k) over the valid pixels of the references."""

from __future__ import annotations

from typing import Any

import datasets
import evaluate
import numpy as np

from .streaming import StreamingMetric, to_numpy

AVERAGES = ("image", "pixel")

_DESCRIPTION = """
Monocular depth errors over valid pixels, those whose reference depth is finite and > 0 (and within
[min_depth, max_depth] when given):
abs_rel = mean(|pred - ref| / ref); rmse = sqrt(mean((pred - ref)^2)); delta1/2/3 = share of pixels with
max(pred / ref, ref / pred) < 1.25, 1.25^2, 1.25^3. Predictions are clipped to [min_depth, max_depth] when given
(and kept above 1e-8, so the ratio stays finite), as NYU-v2 / KITTI evaluations do.
With average="image" (the NYU-v2 convention) each image's metrics are computed over its own valid pixels and then
averaged over images (images without a valid pixel are skipped); with average="pixel" the valid pixels of all
images are pooled.
"""

_INPUTS = """
Args:
    predictions (`list` of 2-D float arrays/tensors): predicted depth, one `(height, width)` map per image (the
        `predicted_depth` of `post_process_depth_estimation`, at the reference size).
    references (`list` of 2-D float arrays/tensors/PIL "F" images): reference depth in the same unit; 0, negative
        and non-finite values mark invalid pixels.

Returns:
    `abs_rel`, `rmse`, `delta1`, `delta2`, `delta3` (floats; NaN if no pixel was valid).

Example:

    >>> metric = DepthError()
    >>> metric.compute(predictions=[[[1.0, 3.0]]], references=[[[1.0, 2.0]]])["abs_rel"]  # (0 + 1/2) / 2
    0.25
"""

_DEPTH_MAP = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
_METRICS = ("abs_rel", "rmse", "delta1", "delta2", "delta3")


class DepthError(StreamingMetric):
    """Depth errors, accumulated as sums (per pixel and per image) so that no map is kept.

    Args:
        min_depth (`float`, *optional*): references below it are invalid; predictions are clipped up to it.
        max_depth (`float`, *optional*): references above it are invalid; predictions are clipped down to it.
        average (`str`, *optional*, defaults to `"image"`): `"image"` (mean of per-image metrics) or `"pixel"`
            (metrics over the pooled valid pixels).
        **kwargs: passed to `evaluate.Metric`.
    """

    metric_name = "depth_error"

    def __init__(
        self,
        min_depth: float | None = None,
        max_depth: float | None = None,
        average: str = "image",
        **kwargs,
    ):
        if average not in AVERAGES:
            raise ValueError(f"average={average!r}; accepted: {list(AVERAGES)}")
        for name, value in (("min_depth", min_depth), ("max_depth", max_depth)):
            if value is not None and not (
                isinstance(value, (int, float)) and np.isfinite(value) and value > 0
            ):
                raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")
        if min_depth is not None and max_depth is not None and min_depth >= max_depth:
            raise ValueError(f"min_depth={min_depth} must be below max_depth={max_depth}")
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.average = average
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Eigen et al., Depth Map Prediction from a Single Image using a Multi-Scale Deep Network, 2014.",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": _DEPTH_MAP, "references": _DEPTH_MAP}),
        )

    def _init_state(self) -> dict[str, Any]:
        # Pooled sums: abs_rel, squared error, delta1..3 hits over all valid pixels, and their count.
        # Per-image sums: each image's abs_rel, rmse, delta1..3, and the number of images with a valid pixel.
        return {
            "pixel_sums": np.zeros(5),
            "pixels": 0,
            "image_sums": np.zeros(5),
            "images": 0,
        }

    def _update_state(self, state: dict[str, Any], predictions: list, references: list) -> None:
        low = self.min_depth if self.min_depth is not None else 1e-8
        high = self.max_depth if self.max_depth is not None else np.inf
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction = to_numpy(prediction).astype(np.float64)
            reference = to_numpy(reference).astype(np.float64)
            if prediction.ndim != 2 or prediction.shape != reference.shape:
                raise ValueError(
                    f"depth_error example {index}: prediction {prediction.shape} and reference {reference.shape} "
                    "must be 2-D maps of the same (height, width); post-process predictions to the reference size"
                )
            with np.errstate(invalid="ignore"):
                valid = np.isfinite(reference) & (reference > 0) & (reference >= low) & (reference <= high)
            if not valid.any():
                continue
            if not np.isfinite(prediction[valid]).all():
                raise ValueError(
                    f"depth_error example {index}: the prediction has non-finite values at valid pixels"
                )
            pred, ref = np.clip(prediction[valid], low, high), reference[valid]
            ratio = np.maximum(pred / ref, ref / pred)
            sums = np.array(
                [
                    (np.abs(pred - ref) / ref).sum(),
                    ((pred - ref) ** 2).sum(),
                    (ratio < 1.25).sum(),
                    (ratio < 1.25**2).sum(),
                    (ratio < 1.25**3).sum(),
                ]
            )
            count = ref.size
            state["pixel_sums"] += sums
            state["pixels"] += count
            per_image = sums / count
            per_image[1] = np.sqrt(per_image[1])  # this image's rmse
            state["image_sums"] += per_image
            state["images"] += 1

    def _compute_from_state(self, state: dict[str, Any]) -> dict[str, float]:
        if self.average == "image":
            values = state["image_sums"] / state["images"] if state["images"] else np.full(5, np.nan)
        else:
            values = state["pixel_sums"] / state["pixels"] if state["pixels"] else np.full(5, np.nan)
            values[1] = np.sqrt(values[1])
        return dict(zip(_METRICS, (float(v) for v in values)))


__all__ = ["AVERAGES", "DepthError"]
