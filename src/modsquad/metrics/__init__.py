"""Evaluation metrics and the evaluation loop: metrics shipped with modsquad, compatible with Hugging Face `evaluate`,
and `evaluate_model` (`evaluation`), which runs a model over a dataset split and scores it with its task's metric.

Each metric is an `evaluate.Metric` subclass in its own script, so it can be used either way:

```python
>>> import evaluate
>>> from modsquad.metrics import MeanIoU, metric_path
>>> metric = MeanIoU(num_labels=150)                                    # directly
>>> metric = evaluate.load(metric_path("mean_iou"), num_labels=150)    # or by path, offline
```

The metrics fold every batch into running statistics (see [`StreamingMetric`]), so dense maps are never all held.
"""

from __future__ import annotations

from pathlib import Path

from .depth_error import DepthError
from .mean_average_precision import MeanAveragePrecision
from .mean_iou import MeanIoU
from .streaming import StreamingMetric
from .top_k_accuracy import TopKAccuracy

# metric name (= script file name, = `metric.name`) -> class
METRICS: dict[str, type[StreamingMetric]] = {
    cls.metric_name: cls for cls in (TopKAccuracy, MeanIoU, MeanAveragePrecision, DepthError)
}


def metric_path(name: str) -> str:
    """Path of the script of metric `name`, for `evaluate.load(metric_path(name), **init_kwargs)`.

    Args:
        name (`str`): one of `"top_k_accuracy"`, `"mean_iou"`, `"mean_average_precision"`, `"depth_error"`.

    Returns:
        `str`: absolute path of the metric's `.py` file inside the installed package.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; modsquad ships {sorted(METRICS)}")
    return str(Path(__file__).with_name(f"{name}.py"))


__all__ = [
    "METRICS",
    "DepthError",
    "MeanAveragePrecision",
    "MeanIoU",
    "StreamingMetric",
    "TopKAccuracy",
    "metric_path",
]
