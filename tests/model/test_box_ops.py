"""Box conversions, IoU / GIoU and NMS against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from modsquad.model.box_ops import (
    aligned_generalized_box_iou,
    batched_nms,
    box_area,
    box_iou,
    cxcywh_to_xyxy,
    generalized_box_iou,
    nms,
    xywh_to_cxcywh,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


def test_conversions_match_hand_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.1]])
    xyxy = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.0, 0.7, 0.5, 0.8]])
    torch.testing.assert_close(cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(xyxy_to_xywh(xyxy), torch.tensor([[0.4, 0.3, 0.2, 0.4], [0.0, 0.7, 0.5, 0.1]]))
    torch.testing.assert_close(
        xywh_to_cxcywh(torch.tensor([[10.0, 20.0, 4.0, 6.0]])), torch.tensor([[12.0, 23.0, 4.0, 6.0]])
    )
    # Leading dimensions are kept.
    assert cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)


def test_area_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 2.0]])
    torch.testing.assert_close(box_area(b), torch.tensor([4.0, 4.0, 2.0]))
    # Overlap 1, union 4 + 4 - 1 = 7; identical boxes 1; disjoint boxes 0.
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 1.0, 0.0]]))
    # Enclosing boxes: 3x3 = 9, 2x2 = 4 and 4x2 = 8 (union 4 + 2 = 6).
    expected_giou = torch.tensor([[1 / 7 - (9 - 7) / 9, 1.0, 0.0 - (8 - 6) / 8]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected_giou)
    assert box_iou(b, a).shape == (3, 1)


def test_aligned_giou_is_the_diagonal_of_the_pairwise_one():
    boxes1 = cxcywh_to_xyxy(torch.rand(5, 4) * 0.5 + 0.1)
    boxes2 = cxcywh_to_xyxy(torch.rand(5, 4) * 0.5 + 0.1)
    torch.testing.assert_close(
        aligned_generalized_box_iou(boxes1, boxes2), generalized_box_iou(boxes1, boxes2).diag()
    )
    with pytest.raises(ValueError, match=r"\(5, 4\) and \(4, 4\)"):
        aligned_generalized_box_iou(boxes1, boxes2[:4])


def test_nms_keeps_the_best_of_each_overlapping_group():
    boxes = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # 0: best of the first group
            [1.0, 1.0, 11.0, 11.0],  # 1: IoU 81/119 = 0.68 with box 0
            [20.0, 20.0, 30.0, 30.0],  # 2: alone
            [0.0, 0.0, 10.0, 12.0],  # 3: IoU 100/120 = 0.83 with box 0
            [5.0, 0.0, 15.0, 10.0],  # 4: IoU 50/150 = 0.33 with box 0
        ]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95])
    assert nms(boxes, scores, iou_threshold=0.5).tolist() == [4, 0, 2]
    # A looser threshold keeps box 1 (0.68) but still drops box 3 (0.83).
    assert nms(boxes, scores, iou_threshold=0.7).tolist() == [4, 0, 1, 2]
    assert nms(boxes[:0], scores[:0], 0.5).tolist() == []
    with pytest.raises(ValueError, match="scores"):
        nms(boxes, scores[:3], 0.5)


def test_batched_nms_never_suppresses_across_groups():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, scores, torch.tensor([0, 0, 0]), 0.5).tolist() == [0]
    assert batched_nms(boxes[:0], scores[:0], torch.tensor([], dtype=torch.long), 0.5).tolist() == []
