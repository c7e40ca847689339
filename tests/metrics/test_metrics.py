"""The metrics shipped in modsquad.metrics, each against a case computed by hand."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest
import torch

from modsquad.metrics import (
    METRICS,
    DepthError,
    MeanAveragePrecision,
    MeanIoU,
    TopKAccuracy,
    metric_path,
)


# ------------------------------------------------------------------------------------------------ accuracy
def test_top1_and_top5_accuracy_by_hand():
    scores = np.array(
        [
            [0.0, 0.1, 0.9, 0.2, 0.3, 0.4],  # reference 2 is the best class: a top-1 hit
            [0.5, 0.1, 0.0, 0.9, 0.8, 0.2],  # reference 0 ranks 3rd: a top-5 hit only
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # reference 5 ranks last: a miss
        ]
    )
    result = TopKAccuracy().compute(predictions=scores, references=[2, 0, 5])
    assert result == pytest.approx({"accuracy": 1 / 3, "top5_accuracy": 2 / 3})


def test_accuracy_streams_batches_and_breaks_ties_like_argmax():
    metric = TopKAccuracy(top_k=(1, 2))
    # Tied scores: argmax picks class 0, so reference 1 is a top-1 miss but a top-2 hit.
    metric.add_batch(predictions=torch.tensor([[1.0, 1.0, 0.0]]), references=torch.tensor([1]))
    metric.add(prediction=[0.0, 0.2, 0.7], reference=2)
    assert len(metric) == 2
    assert metric.compute() == {"accuracy": 0.5, "top2_accuracy": 1.0}
    assert len(metric) == 0  # compute starts afresh


def test_accuracy_rejects_class_ids_and_out_of_range_references():
    with pytest.raises(ValueError, match="scores per class"):
        TopKAccuracy().compute(predictions=[1, 0], references=[1, 0])
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\), got \[3\]"):
        TopKAccuracy().compute(predictions=[[0.1, 0.2, 0.7]], references=[3])
    with pytest.raises(ValueError, match="top_k"):
        TopKAccuracy(top_k=(0,))


# ------------------------------------------------------------------------------------------------ mean IoU
# 2x3 maps, classes 0..2, one ignored pixel. Counted (reference, prediction) pairs:
# (0,0) (0,1) (1,1) | (1,1) (2,1) [the (255, 0) pixel is ignored].
# class 0: intersection 1, union 2 + 1 - 1 = 2 -> IoU 1/2, accuracy 1/2
# class 1: intersection 2, union 2 + 4 - 2 = 4 -> IoU 1/2, accuracy 2/2
# class 2: intersection 0, union 1 + 0 - 0 = 1 -> IoU 0,   accuracy 0/1
REFERENCE = np.array([[0, 0, 1], [1, 2, 255]])
PREDICTION = np.array([[0, 1, 1], [1, 1, 0]])


def test_mean_iou_by_hand():
    result = MeanIoU(num_labels=3).compute(predictions=[PREDICTION], references=[REFERENCE])
    assert result["per_category_iou"] == pytest.approx([0.5, 0.5, 0.0])
    assert result["per_category_accuracy"] == pytest.approx([0.5, 1.0, 0.0])
    assert result["mean_iou"] == pytest.approx(1 / 3)
    assert result["mean_accuracy"] == pytest.approx(0.5)
    assert result["overall_accuracy"] == pytest.approx(3 / 5)


def test_mean_iou_accumulates_over_batches_and_skips_absent_classes():
    metric = MeanIoU(num_labels=4)
    # The same pixels as one map, now as two single-row images in two batches; class 3 never occurs.
    metric.add_batch(predictions=[torch.tensor(PREDICTION[:1])], references=[REFERENCE[:1]])
    metric.add_batch(predictions=[PREDICTION[1:]], references=[REFERENCE[1:]])
    result = metric.compute()
    assert math.isnan(result["per_category_iou"][3])
    assert result["mean_iou"] == pytest.approx(1 / 3)
    assert result["overall_accuracy"] == pytest.approx(3 / 5)


def test_mean_iou_rejects_bad_maps():
    metric = MeanIoU(num_labels=3)
    with pytest.raises(ValueError, match=r"ids \[7\] outside \[0, 3\)"):
        metric.compute(predictions=[np.full((2, 3), 7)], references=[REFERENCE])
    with pytest.raises(ValueError, match="same \\(height, width\\)"):
        metric.compute(predictions=[PREDICTION[:, :2]], references=[REFERENCE])
    with pytest.raises(ValueError, match="ignore_index=1 is a class id"):
        MeanIoU(num_labels=3, ignore_index=1)


# ------------------------------------------------------------------------------------------------ detection
def _det(boxes, labels, scores=None):
    entry = {"boxes": boxes, "labels": labels}
    if scores is not None:
        entry["scores"] = scores
    return entry


def test_detection_perfect_predictions_give_map_one():
    references = [_det([[10, 10, 60, 50], [0, 0, 20, 20]], [0, 1]), _det([[5, 5, 40, 45]], [1])]
    predictions = [{**ref, "scores": [0.9] * len(ref["labels"])} for ref in references]
    result = MeanAveragePrecision().compute(predictions=predictions, references=references)
    for key in ("map", "map_50", "map_75", "mar_100"):
        assert result[key] == pytest.approx(1.0), key


def test_detection_box_at_iou_062_counts_at_50_not_at_75():
    # Predicted box 10 x 6.2 inside the 10 x 10 reference: IoU = 62 / 100. (0.62 rather than exactly 0.6 keeps
    # clear of the 0.60 threshold, where float rounding would decide.) It matches at IoU 0.50, 0.55 and 0.60.
    result = MeanAveragePrecision().compute(
        predictions=[_det([[0, 0, 10, 6.2]], [0], [0.8])], references=[_det([[0, 0, 10, 10]], [0])]
    )
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map_75"] == pytest.approx(0.0)
    assert result["map"] == pytest.approx(3 / 10)


def test_detection_missed_box_halves_recall():
    # Two reference boxes, one found: recall 1/2. COCO's AP samples precision at recalls 0, 0.01, ..., 1:
    # the 51 points up to 0.5 have precision 1, the 50 above have 0 -> AP = 51 / 101.
    references = [_det([[0, 0, 10, 10]], [0]), _det([[20, 20, 30, 30]], [0])]
    predictions = [_det([[0, 0, 10, 10]], [0], [0.9]), _det([], [], [])]
    result = MeanAveragePrecision().compute(predictions=predictions, references=references)
    assert result["mar_100"] == pytest.approx(0.5)
    assert result["map"] == pytest.approx(51 / 101)


def test_detection_images_without_boxes():
    reference = _det([[0, 0, 10, 10]], [0])
    metric = MeanAveragePrecision()
    # An image with no reference and no prediction changes nothing.
    metric.add_batch(
        predictions=[_det([[0, 0, 10, 10]], [0], [0.5]), _det([], [], [])],
        references=[reference, _det([], [])],
    )
    assert metric.compute()["map"] == pytest.approx(1.0)
    # A confident detection on an empty image is a false positive ranked first: precision 1/2 at every recall.
    result = metric.compute(
        predictions=[_det([[0, 0, 10, 10]], [0], [0.5]), _det([[3, 3, 9, 9]], [0], [0.9])],
        references=[reference, _det([], [])],
    )
    assert result["map"] == pytest.approx(0.5)
    # Nothing to find at all: COCO reports -1 (undefined).
    assert metric.compute(predictions=[_det([], [], [])], references=[_det([], [])])["map"] == -1.0


def test_detection_rejects_malformed_entries():
    metric = MeanAveragePrecision()
    with pytest.raises(ValueError, match="keys \\['boxes', 'scores', 'labels'\\]"):
        metric.compute(predictions=[_det([[0, 0, 1, 1]], [0])], references=[_det([[0, 0, 1, 1]], [0])])
    with pytest.raises(ValueError, match="x_max"):
        metric.compute(predictions=[_det([[5, 0, 1, 1]], [0], [0.5])], references=[_det([], [])])
    with pytest.raises(ValueError, match="1 boxes but 2 labels"):
        metric.compute(predictions=[_det([], [], [])], references=[_det([[0, 0, 1, 1]], [0, 1])])


# ------------------------------------------------------------------------------------------------ depth
# Image 1: valid pixels (pred 1, ref 1) and (pred 2, ref 4); ref 0 and NaN are invalid.
#   abs_rel = (0 + 2/4) / 2 = 0.25, rmse = sqrt((0 + 4) / 2), ratios 1 and 2 -> delta1 = delta2 = delta3 = 1/2.
# Image 2: (pred 3, ref 2): abs_rel 0.5, rmse 1, ratio 1.5 -> delta1 = 0, delta2 = delta3 = 1 (1.5 < 1.25^2).
DEPTH_PREDICTIONS = [np.array([[1.0, 2.0], [4.0, 9.0]]), np.array([[3.0]])]
DEPTH_REFERENCES = [np.array([[1.0, 4.0], [0.0, np.nan]]), np.array([[2.0]])]


def test_depth_errors_per_image_by_hand():
    result = DepthError().compute(predictions=DEPTH_PREDICTIONS, references=DEPTH_REFERENCES)
    assert result == pytest.approx(
        {"abs_rel": 0.375, "rmse": (math.sqrt(2) + 1) / 2, "delta1": 0.25, "delta2": 0.75, "delta3": 0.75}
    )


def test_depth_errors_per_pixel_by_hand():
    result = DepthError(average="pixel").compute(predictions=DEPTH_PREDICTIONS, references=DEPTH_REFERENCES)
    assert result == pytest.approx(
        {"abs_rel": 1 / 3, "rmse": math.sqrt(5 / 3), "delta1": 1 / 3, "delta2": 2 / 3, "delta3": 2 / 3}
    )


def test_depth_caps_drop_references_and_clip_predictions():
    # max_depth 2.5: reference 4 becomes invalid; prediction 3 is clipped to 2.5 -> image 2 abs_rel 0.5 / 2.
    result = DepthError(max_depth=2.5).compute(predictions=DEPTH_PREDICTIONS, references=DEPTH_REFERENCES)
    assert result["abs_rel"] == pytest.approx((0.0 + 0.25) / 2)
    # [1.5, 3] leaves image 1 without a valid pixel: it is skipped, not counted as perfect.
    result = DepthError(min_depth=1.5, max_depth=3).compute(
        predictions=DEPTH_PREDICTIONS, references=DEPTH_REFERENCES
    )
    assert result["abs_rel"] == pytest.approx(0.5)
    # No valid pixel anywhere: undefined.
    result = DepthError(min_depth=5).compute(predictions=DEPTH_PREDICTIONS, references=DEPTH_REFERENCES)
    assert all(math.isnan(value) for value in result.values())
    with pytest.raises(ValueError, match="min_depth=3 must be below max_depth=2"):
        DepthError(min_depth=3, max_depth=2)
    with pytest.raises(ValueError, match="average='mean'"):
        DepthError(average="mean")


# ------------------------------------------------------------------------------------------------ evaluate API
EXAMPLES = {
    "top_k_accuracy": ({}, [[0.2, 0.8], [0.6, 0.4]], [1, 1]),
    "mean_iou": ({"num_labels": 3}, [PREDICTION], [REFERENCE]),
    "mean_average_precision": ({}, [_det([[0, 0, 10, 6.2]], [0], [0.8])], [_det([[0, 0, 10, 10]], [0])]),
    "depth_error": ({}, DEPTH_PREDICTIONS, DEPTH_REFERENCES),
}


@pytest.mark.parametrize("name", sorted(METRICS))
def test_metric_loads_offline_by_path_and_matches_the_class(name):
    kwargs, predictions, references = EXAMPLES[name]
    loaded = evaluate.load(metric_path(name), **kwargs)
    assert isinstance(loaded, evaluate.Metric) and loaded.name == name
    direct = METRICS[name](**kwargs)
    expected = direct.compute(predictions=predictions, references=references)
    result = loaded.compute(predictions=predictions, references=references)
    assert result.keys() == expected.keys()
    flat = [np.hstack([np.ravel(value) for value in r.values()]) for r in (result, expected)]
    assert np.allclose(*flat, equal_nan=True)
    assert direct._compute(predictions=predictions, references=references).keys() == expected.keys()


def test_combine_two_of_our_metrics():
    combined = evaluate.combine(
        [TopKAccuracy(top_k=(1,)), evaluate.load(metric_path("top_k_accuracy"), top_k=(2,))]
    )
    combined.add_batch(predictions=[[0.1, 0.3, 0.6], [0.5, 0.4, 0.1]], references=[1, 1])
    assert combined.compute() == {"accuracy": 0.0, "top2_accuracy": 1.0}
    # Same metric twice with different options: named, prefixed keys.
    depth = evaluate.combine({"all": DepthError(), "capped": DepthError(max_depth=2.5)}, force_prefix=True)
    result = depth.compute(predictions=DEPTH_PREDICTIONS, references=DEPTH_REFERENCES)
    assert result["all_abs_rel"] == pytest.approx(0.375) and result["capped_abs_rel"] == pytest.approx(0.125)


def test_streaming_api_errors():
    with pytest.raises(ValueError, match="no examples were added"):
        DepthError().compute()
    with pytest.raises(
        ValueError, match=r"unknown arguments \['top_k'\].*other options are constructor arguments"
    ):
        TopKAccuracy().compute(predictions=[[0.1, 0.9]], references=[1], top_k=(1,))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        TopKAccuracy().add_batch(predictions=[[0.1], [0.2]], references=[0])
    with pytest.raises(ValueError, match="num_process=2"):
        TopKAccuracy(num_process=2)
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        metric_path("accuracy")
