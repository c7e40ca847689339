"""Top-k accuracy of image classification, from the scores of every class."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import evaluate
import numpy as np

from .streaming import StreamingMetric, to_numpy

_DESCRIPTION = """
Top-k accuracy: the share of examples whose reference class is among the k highest-scoring classes. Ties are broken
towards the lower class id, as `argmax` does, so top-1 accuracy equals the accuracy of `logits.argmax(-1)`. With
fewer than k classes every class is in the top k and top-k accuracy is 1.
"""

_INPUTS = """
Args:
    predictions (`list` of `list[float]`, or an array of shape `(num_examples, num_classes)`): logits, probabilities
        or any scores per class (higher is more likely).
    references (`list[int]`): the class id of each example, in `[0, num_classes)`.

Returns:
    `accuracy` (top-1) and `top{k}_accuracy` for each other k of `top_k`, in [0, 1].

Example:

    >>> metric = TopKAccuracy(top_k=(1, 2))
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], references=[1, 2])
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
"""


class TopKAccuracy(StreamingMetric):
    """Top-1 and top-k accuracy from class scores, accumulated as hit counts.

    Args:
        top_k (`Sequence[int]`, *optional*, defaults to `(1, 5)`): the k values to report.
        **kwargs: passed to `evaluate.Metric` (`experiment_id`, `cache_dir`, ...).
    """

    metric_name = "top_k_accuracy"

    def __init__(self, top_k: Sequence[int] = (1, 5), **kwargs):
        top_k = tuple(top_k)
        if not top_k or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in top_k):
            raise ValueError(f"top_k must be a non-empty sequence of positive ints, got {top_k!r}")
        self.top_k = tuple(sorted(set(top_k)))
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _init_state(self) -> dict[str, Any]:
        return {"hits": dict.fromkeys(self.top_k, 0), "count": 0}

    def _update_state(self, state: dict[str, Any], predictions: list, references: list) -> None:
        if not predictions:
            return
        scores = to_numpy(predictions).astype(np.float64)
        labels = to_numpy(references)
        if scores.ndim != 2:
            raise ValueError(
                f"top_k_accuracy predictions must be scores per class, shape (num_examples, num_classes); got shape "
                f"{scores.shape} (class ids alone cannot give top-k accuracy)"
            )
        num_classes = scores.shape[1]
        if labels.shape != (len(scores),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"top_k_accuracy references must be {len(scores)} integer class ids, got {labels.dtype} of shape "
                f"{labels.shape}"
            )
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(
                f"top_k_accuracy references must be class ids in [0, {num_classes}), got {sorted(set(bad.tolist()))}"
            )
        # A stable sort of the negated scores breaks ties towards the lower id, like argmax.
        order = np.argsort(-scores, axis=1, kind="stable")
        rank = np.argmax(order == labels[:, None], axis=1)
        for k in self.top_k:
            state["hits"][k] += int((rank < k).sum())
        state["count"] += len(labels)

    def _compute_from_state(self, state: dict[str, Any]) -> dict[str, float]:
        count = state["count"]
        return {("accuracy" if k == 1 else f"top{k}_accuracy"): state["hits"][k] / count for k in self.top_k}


__all__ = ["TopKAccuracy"]
