"""The base of the package's metrics: an `evaluate.Metric` that reduces each batch to running statistics on arrival.

`evaluate`'s own metrics write every prediction and reference to an Arrow cache and hand them all to `_compute` at
the end, which for segmentation or depth maps means holding the whole split at once. These metrics keep only what
their result needs (a confusion matrix, error sums, the boxes of a detection split), so memory does not grow with
image size.

This file is also imported by each metric script when it is loaded with `evaluate.load(path)`: `evaluate` copies
files named in a top-level `from .<module> import ...` line next to the script, so the import must keep that form.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any

import evaluate
import numpy as np


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (on any device), PIL image, array or nested list as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class StreamingMetric(evaluate.Metric, metaclass=ABCMeta):
    """An `evaluate.Metric` whose `add_batch` folds the batch into a running state instead of caching it.

    Use it like any `evaluate` metric: `add_batch(predictions=..., references=...)` per batch, then `compute()`; or
    `compute(predictions=..., references=...)` at once. `compute` returns the result and starts a fresh state.
    `evaluate.combine` works with these metrics. The state lives in this process: for distributed evaluation, gather
    predictions first (e.g. `accelerator.gather_for_metrics`) and compute on one process.

    Subclasses set `metric_name` (and `compute_options`) and implement `_info`, `_init_state`, `_update_state` and
    `_compute_from_state`.
    """

    metric_name: str = ""
    # Keyword arguments `compute` accepts besides predictions and references: those of the Hub metric of the same
    # meaning, so that code written for `evaluate.load("mean_iou")` runs unchanged. Subclasses keep a state from
    # which they can be applied at the end.
    compute_options: tuple[str, ...] = ()

    def __init__(self, **kwargs):
        if kwargs.get("num_process", 1) != 1:
            raise ValueError(
                f"num_process={kwargs['num_process']}: {type(self).__name__} keeps its running statistics in one "
                "process; gather the predictions to one process and use num_process=1"
            )
        super().__init__(**kwargs)
        # The default name is derived from the class name ("MeanIoU" -> "mean_io_u"); combine() prefixes keys with it.
        self.info.module_name = self.metric_name
        self._state = self._init_state()
        self._num_examples = 0

    def __len__(self) -> int:
        """Number of examples added since the last `compute`."""
        return self._num_examples

    @abstractmethod
    def _init_state(self) -> dict[str, Any]:
        """An empty running state."""

    @abstractmethod
    def _update_state(self, state: dict[str, Any], predictions: list, references: list) -> None:
        """Folds one batch into `state`; raises a ValueError naming any malformed example."""

    @abstractmethod
    def _compute_from_state(self, state: dict[str, Any], **options) -> dict[str, Any]:
        """The metric values of everything folded into `state`, under the `compute_options` given."""

    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Adds a batch of predictions and references to the running statistics.

        Args:
            predictions (`list`): one prediction per example, in the format described below.
            references (`list`): one reference per example, in the format described below.
        """
        if kwargs:
            raise ValueError(
                f"{self.metric_name} takes only predictions and references, got extra inputs {sorted(kwargs)}"
            )
        if predictions is None or references is None:
            raise ValueError(f"{self.metric_name}.add_batch needs both predictions and references")
        predictions, references = list(predictions), list(references)
        if len(predictions) != len(references):
            raise ValueError(
                f"{self.metric_name}: got {len(predictions)} predictions for {len(references)} references"
            )
        self._update_state(self._state, predictions, references)
        self._num_examples += len(predictions)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Adds one prediction and its reference to the running statistics.

        Args:
            prediction: one prediction, in the format described below.
            reference: its reference, in the format described below.
        """
        self.add_batch(predictions=[prediction], references=[reference], **kwargs)

    def compute(self, *, predictions=None, references=None, **options) -> dict[str, Any]:
        """Adds the given batch (if any), returns the metrics of everything added, and resets the statistics.

        Args:
            predictions (`list`, *optional*): a last batch of predictions.
            references (`list`, *optional*): its references.
            **options: the keyword arguments of the Hub metric of the same name that this metric accepts
                (`compute_options`), e.g. `num_labels`, `ignore_index`, `reduce_labels` of `mean_iou`; they apply to
                everything added, as they do on the Hub.
        """
        self._check_options(options)
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        if self._num_examples == 0:
            raise ValueError(f"{self.metric_name}: no examples were added; call add_batch before compute")
        state, self._state, self._num_examples = self._state, self._init_state(), 0
        return self._compute_from_state(state, **options)

    def _compute(self, *, predictions=None, references=None, **options) -> dict[str, Any]:
        # evaluate's hook: the metrics of exactly these examples, leaving the running statistics untouched.
        self._check_options(options)
        if predictions is None or references is None or len(predictions) == 0:
            raise ValueError(f"{self.metric_name}: no examples were given")
        state = self._init_state()
        self._update_state(state, list(predictions), list(references))
        return self._compute_from_state(state, **options)

    def _check_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.compute_options))
        if unknown:
            accepted = ["predictions", "references", *self.compute_options]
            raise ValueError(
                f"{self.metric_name}.compute got unknown arguments {unknown}; accepted: {accepted} (other options "
                "are constructor arguments)"
            )


__all__ = ["StreamingMetric", "to_numpy"]
