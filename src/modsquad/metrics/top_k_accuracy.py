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
fewer than k classes every class is in the top k and top-k accuracy is 1. Predicted class ids (instead of scores)
give top-1 accuracy only, as the Hub `accuracy` metric computes it.
"""

_INPUTS = """
Args:
    predictions (`list` of `list[float]`, or an array of shape `(num_examples, num_classes)`): logits, probabilities
        or any scores per class (higher is more likely); or `list[int]` predicted class ids (top-1 only).
    references (`list[int]`): the class id of each example, in `[0, num_classes)`.
    normalize (`bool`, *optional*, defaults to `True`): the share of hits; `False` gives their (weighted) number
        (the Hub `accuracy` argument).
    sample_weight (`list[float]`, *optional*): one weight per example added (the Hub `accuracy` argument).

Returns:
    `accuracy` (top-1) and `top{k}_accuracy` for each other k of `top_k`, in [0, 1] (or counts when
    `normalize=False`).

Example:

    >>> metric = TopKAccuracy(top_k=(1, 2))
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]], references=[1, 2])
    {'accuracy': 0.5, 'top2_accuracy': 1.0}
    >>> TopKAccuracy(top_k=(1,)).compute(predictions=[1, 0, 2], references=[1, 1, 2], normalize=False)
    {'accuracy': 2.0}
"""

# The rank recorded for a wrong class-id prediction: a top-1 miss, at an unknown place in the ranking.
_MISSED = np.iinfo(np.int64).max


class TopKAccuracy(StreamingMetric):
    """Top-1 and top-k accuracy from class scores, accumulated as the rank of each reference (one int per example,
    so that the Hub `accuracy` metric's `sample_weight` and `normalize` apply at `compute`).

    Args:
        top_k (`Sequence[int]`, *optional*, defaults to `(1, 5)`): the k values to report.
        **kwargs: passed to `evaluate.Metric` (`experiment_id`, `cache_dir`, ...).
    """

    metric_name = "top_k_accuracy"
    compute_options = ("normalize", "sample_weight")

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
        return {"ranks": []}

    def _update_state(self, state: dict[str, Any], predictions: list, references: list) -> None:
        if not predictions:
            return
        scores = to_numpy(predictions)
        labels = to_numpy(references)
        if labels.shape != (len(scores),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"top_k_accuracy references must be {len(scores)} integer class ids, got {labels.dtype} of shape "
                f"{labels.shape}"
            )
        if scores.ndim == 1 and np.issubdtype(scores.dtype, np.integer):
            if self.top_k != (1,):
                raise ValueError(
                    f"top_k_accuracy got class ids, which give top-1 accuracy only, but top_k={self.top_k}; pass "
                    "scores per class, shape (num_examples, num_classes), or use TopKAccuracy(top_k=(1,))"
                )
            if (labels < 0).any():
                raise ValueError(f"top_k_accuracy references must be class ids >= 0, got {labels.tolist()}")
            state["ranks"].append(np.where(scores == labels, 0, _MISSED))
            return
        if scores.ndim != 2:
            raise ValueError(
                f"top_k_accuracy predictions must be scores per class, shape (num_examples, num_classes); got shape "
                f"{scores.shape} (class ids alone cannot give top-k accuracy)"
            )
        num_classes = scores.shape[1]
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(
                f"top_k_accuracy references must be class ids in [0, {num_classes}), got {sorted(set(bad.tolist()))}"
            )
        # A stable sort of the negated scores breaks ties towards the lower id, like argmax.
        order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
        state["ranks"].append(np.argmax(order == labels[:, None], axis=1).astype(np.int64))

    def _compute_from_state(
        self, state: dict[str, Any], normalize: bool = True, sample_weight: Sequence[float] | None = None
    ) -> dict[str, float]:
        ranks = np.concatenate(state["ranks"])
        weights = np.ones(len(ranks))
        if sample_weight is not None:
            weights = to_numpy(sample_weight).astype(np.float64).reshape(-1)
            if len(weights) != len(ranks):
                raise ValueError(
                    f"top_k_accuracy: sample_weight has {len(weights)} weights for {len(ranks)} examples"
                )
        result = {}
        for k in self.top_k:
            hits = float(weights[ranks < k].sum())
            result["accuracy" if k == 1 else f"top{k}_accuracy"] = hits / weights.sum() if normalize else hits
        return result


__all__ = ["TopKAccuracy"]
