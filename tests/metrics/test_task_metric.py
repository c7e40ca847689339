"""Each task reports only meaningful metrics: top-5 accuracy needs more than five classes."""

from __future__ import annotations

import numpy as np

from modsquad.metrics.evaluation import task_metric


def test_top5_accuracy_only_for_more_than_five_classes():
    scores = np.eye(6)[[0, 1, 2]]  # every example right at top-1
    few = task_metric({"name": "cls", "type": "image-classification", "num_labels": 5})
    assert few.compute(predictions=scores[:, :5], references=[0, 1, 2]) == {"accuracy": 1.0}
    many = task_metric({"name": "cls", "type": "image-classification", "num_labels": 6})
    assert many.compute(predictions=scores, references=[0, 1, 2]) == {"accuracy": 1.0, "top5_accuracy": 1.0}
