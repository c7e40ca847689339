"""Code written for the Hub's `evaluate` metrics runs on ours: `mean_iou`'s and `accuracy`'s compute-time keyword
arguments, and torchmetrics' box layouts for the COCO metric."""

from __future__ import annotations

import evaluate
import numpy as np
import pytest

from modsquad.metrics import MeanAveragePrecision, MeanIoU, TopKAccuracy, metric_path

# An ADE20K-style map: 0 is "other" (ignored after reduce_labels), classes are 1..3 and become 0..2.
ADE_REFERENCE = np.array([[0, 1, 1], [2, 3, 3]])
PREDICTION = np.array([[2, 0, 1], [1, 2, 2]])


def hub_mean_iou(prediction, reference, num_labels, ignore_index, reduce_labels=False, label_map=None):
    """The Hub `mean_iou` script's arithmetic for one image, written out: the reference the task would expect."""
    reference = reference.copy()
    for old, new in (label_map or {}).items():
        reference[reference == old] = new
    if reduce_labels:
        reference[reference == 0] = 255
        reference = reference - 1
        reference[reference == 254] = 255
    counted = reference != ignore_index
    prediction, reference = prediction[counted], reference[counted]
    intersection = np.bincount(prediction[prediction == reference], minlength=num_labels)
    union = np.bincount(prediction, minlength=num_labels) + np.bincount(reference, minlength=num_labels)
    union = union - intersection
    with np.errstate(invalid="ignore"):
        iou = intersection / union
    return float(np.nanmean(iou)), iou


def test_mean_iou_takes_the_hub_metrics_compute_arguments():
    # As on the Hub: load without options, give them to compute.
    metric = evaluate.load(metric_path("mean_iou"))
    result = metric.compute(
        predictions=[PREDICTION],
        references=[ADE_REFERENCE],
        num_labels=3,
        ignore_index=255,
        reduce_labels=True,
    )
    expected_mean, expected_iou = hub_mean_iou(PREDICTION, ADE_REFERENCE, 3, 255, reduce_labels=True)
    assert result["mean_iou"] == pytest.approx(expected_mean)
    np.testing.assert_allclose(result["per_category_iou"], expected_iou)
    # The same options given to the constructor give the same numbers.
    direct = MeanIoU(num_labels=3, reduce_labels=True).compute(
        predictions=[PREDICTION], references=[ADE_REFERENCE]
    )
    assert direct == result


def test_mean_iou_compute_options_apply_to_every_batch_added_before():
    metric = MeanIoU()  # num_labels unknown while adding, as with the Hub metric
    metric.add_batch(predictions=[PREDICTION[:1]], references=[ADE_REFERENCE[:1]])
    metric.add_batch(predictions=[PREDICTION[1:]], references=[ADE_REFERENCE[1:]])
    result = metric.compute(num_labels=3, reduce_labels=True, nan_to_num=-1.0)
    assert result["mean_iou"] == pytest.approx(hub_mean_iou(PREDICTION, ADE_REFERENCE, 3, 255, True)[0])
    # label_map runs before reduce_labels: mapping 3 -> 2 merges the last two classes.
    merged = MeanIoU().compute(
        predictions=[PREDICTION],
        references=[ADE_REFERENCE],
        num_labels=3,
        reduce_labels=True,
        label_map={3: 2},
    )
    mean, iou = hub_mean_iou(PREDICTION, ADE_REFERENCE, 3, 255, True, label_map={3: 2})
    assert merged["mean_iou"] == pytest.approx(mean)
    np.testing.assert_allclose(merged["per_category_iou"], iou)
    # A class absent from references and predictions is NaN, or the nan_to_num value.
    four = MeanIoU().compute(
        predictions=[PREDICTION], references=[ADE_REFERENCE], num_labels=4, reduce_labels=True
    )
    assert np.isnan(four["per_category_iou"][3]) and np.isnan(
        hub_mean_iou(PREDICTION, ADE_REFERENCE, 4, 255, True)[1][3]
    )
    filled = MeanIoU(nan_to_num=0.0).compute(
        predictions=[PREDICTION], references=[ADE_REFERENCE], num_labels=4, reduce_labels=True
    )
    assert filled["per_category_iou"][3] == 0.0 and filled["mean_iou"] == four["mean_iou"]


def test_mean_iou_option_errors_name_the_value():
    with pytest.raises(ValueError, match="needs num_labels"):
        MeanIoU().compute(predictions=[PREDICTION], references=[ADE_REFERENCE])
    with pytest.raises(ValueError, match=r"reference has ids \[3\] outside \[0, 3\)"):
        MeanIoU().compute(predictions=[PREDICTION], references=[ADE_REFERENCE], num_labels=3)
    with pytest.raises(ValueError, match="ignore_index=0 is a class id"):
        MeanIoU().compute(predictions=[PREDICTION], references=[ADE_REFERENCE], num_labels=4, ignore_index=0)


def test_accuracy_takes_class_ids_normalize_and_sample_weight_like_the_hub_accuracy():
    metric = TopKAccuracy(top_k=(1,))
    assert metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1], normalize=False) == {
        "accuracy": 3.0
    }
    weighted = metric.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1], sample_weight=[1, 1, 2, 0])
    assert weighted == {"accuracy": pytest.approx(2 / 4)}
    # scores and top-k: the weights follow the examples across batches
    top2 = TopKAccuracy(top_k=(1, 2))
    top2.add_batch(predictions=[[0.1, 0.5, 0.4]], references=[2])  # top-2 hit only
    top2.add_batch(predictions=[[0.9, 0.05, 0.05]], references=[0])  # top-1 hit
    assert top2.compute(sample_weight=[3.0, 1.0]) == {"accuracy": 0.25, "top2_accuracy": 1.0}
    with pytest.raises(ValueError, match="class ids, which give top-1 accuracy only"):
        TopKAccuracy().compute(predictions=[0, 1], references=[0, 1])
    with pytest.raises(ValueError, match="sample_weight has 1 weights for 2 examples"):
        metric.compute(predictions=[0, 1], references=[0, 1], sample_weight=[1.0])


@pytest.mark.parametrize(
    ("box_format", "box"),
    [
        ("xyxy", [10.0, 20.0, 50.0, 40.0]),
        ("xywh", [10.0, 20.0, 40.0, 20.0]),
        ("cxcywh", [30.0, 30.0, 40.0, 20.0]),
    ],
)
def test_detection_metric_reads_torchmetrics_box_formats(box_format, box):
    shifted = list(box)
    shifted[0] += 8.0  # moves the box right by 8 px: IoU 640 / 960 = 0.67 with the reference
    if box_format == "xyxy":
        shifted[2] += 8.0
    result = MeanAveragePrecision(box_format=box_format).compute(
        predictions=[{"boxes": [shifted], "scores": [0.9], "labels": [1]}],
        references=[{"boxes": [box], "labels": [1]}],
    )
    assert result["map_50"] == pytest.approx(1.0) and result["map_75"] == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"box_format='yxyx'; accepted: \['xyxy', 'xywh', 'cxcywh'\]"):
        MeanAveragePrecision(box_format="yxyx")
