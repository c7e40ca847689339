"""The box operations without a library equivalent (matched-pair GIoU, NMS) against values worked out by hand, and
against the Transformers functions the rest of the package uses."""

from __future__ import annotations

import pytest
import torch
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import generalized_box_iou

from modsquad.model.box_ops import aligned_generalized_box_iou, batched_nms, nms


def test_aligned_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]]).expand(3, 4)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 0.0, 4.0, 2.0]])
    # Overlap 1, union 7, enclosing 3x3; identical boxes; disjoint boxes with union 6 in an enclosing 4x2.
    expected = torch.tensor([1 / 7 - (9 - 7) / 9, 1.0, 0.0 - (8 - 6) / 8])
    torch.testing.assert_close(aligned_generalized_box_iou(a, b), expected)
    # Leading dimensions are kept, as a loss over (batch, cells, 4) needs.
    assert aligned_generalized_box_iou(b[None].expand(2, 3, 4), b[None].expand(2, 3, 4)).shape == (2, 3)


def test_aligned_giou_is_the_diagonal_of_transformers_pairwise_giou():
    boxes1 = center_to_corners_format(torch.rand(5, 4) * 0.5 + 0.1)
    boxes2 = center_to_corners_format(torch.rand(5, 4) * 0.5 + 0.1)
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
