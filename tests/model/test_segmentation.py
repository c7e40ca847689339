"""Semantic segmentation: head shapes, loss, label checks, post-processing, and that it learns (saving, loading and
the pipeline: tests/model/test_head_contract.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

import modsquad.model.feature_pyramid
import modsquad.model.head_segmentation
from modsquad import (
    ModSquadForSemanticSegmentation,
    ModSquadImageProcessor,
    ModSquadSemanticSegmenterOutput,
)
from modsquad.model.head_segmentation import segmentation_loss


@pytest.fixture(name="seg_task")
def seg_task_fixture(all_tasks) -> dict:
    return dict(all_tasks[1], decoder_channels=16)


@pytest.fixture(name="seg_model")
def seg_model_fixture(tiny_config, seg_task):
    """The factory `seg_model(**task_options)`: a segmentation model of `seg_task` updated with the options."""

    def seg_model(**task_options) -> ModSquadForSemanticSegmentation:
        return ModSquadForSemanticSegmentation(tiny_config([dict(seg_task, **task_options)])).eval()

    return seg_model


def shapes_dataset(
    bright_shapes, num_images: int = 16, size: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy backgrounds with two bright squares or discs each; the mask is 1 on shape pixels."""
    images, shapes = bright_shapes(num_images, size, torch.Generator().manual_seed(seed))
    masks = shapes.long()
    return (images - 0.5) / 0.5, masks


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40)])
def test_logits_at_the_finest_pyramid_level(height, width, seg_model):
    model = seg_model()
    outputs = model(torch.randn(2, 3, height, width), output_router_logits=True)
    assert isinstance(outputs, SemanticSegmenterOutput) and isinstance(
        outputs, ModSquadSemanticSegmenterOutput
    )
    # 8px patches: finest level is stride 2 (patch_size / 4)
    assert outputs.logits.shape == (2, 2, height // 2, width // 2)
    assert outputs.loss is None and outputs.hidden_states is None
    assert outputs.aux_loss is not None and len(outputs.router_logits) == len(outputs.expert_indices) == 2


def test_loss_is_cross_entropy_on_upsampled_logits_with_ignore_index(seg_model):
    model = seg_model()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 2, (2, 32, 32))
    labels[0, :10] = 255
    outputs = model(pixel_values, labels=labels, output_router_logits=True)
    upsampled = nn.functional.interpolate(outputs.logits, size=(32, 32), mode="bilinear", align_corners=False)
    expected = nn.functional.cross_entropy(upsampled, labels, ignore_index=255)
    torch.testing.assert_close(outputs.loss - outputs.aux_loss, expected)


def test_fully_ignored_batch_gives_zero_loss_not_nan(seg_model):
    model = seg_model()
    outputs = model(torch.randn(1, 3, 32, 32), labels=torch.full((1, 32, 32), 255), output_router_logits=True)
    assert torch.isfinite(outputs.loss)
    torch.testing.assert_close(outputs.loss - outputs.aux_loss, torch.tensor(0.0))


def test_custom_ignore_index_from_the_task_entry(seg_model):
    model = seg_model(ignore_index=-1)
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 0] = -1
    assert torch.isfinite(model(torch.randn(1, 3, 32, 32), labels=labels).loss)
    labels[0, 0] = 255
    with pytest.raises(ValueError, match=r"values \[255\].*ignore index -1"):
        model(torch.randn(1, 3, 32, 32), labels=labels)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.tensor([[[0, 1], [5, 7]]]), r"values \[5, 7\]; accepted are class ids in \[0, 2\)"),
        (torch.tensor([[[0, -3]]]), r"values \[-3\]"),
        (torch.zeros(1, 2, 2), "must be integer class ids, got dtype torch.float32"),
        (torch.zeros(1, 4, dtype=torch.long), r"shape \(batch_size=1, height, width\), got \(1, 4\)"),
        (torch.zeros(2, 4, 4, dtype=torch.long), r"got \(2, 4, 4\)"),
    ],
)
def test_bad_labels_raise(labels, message, seg_model):
    with pytest.raises(ValueError, match=message):
        seg_model()(torch.randn(1, 3, 32, 32), labels=labels)


def test_bad_decoder_channels_raise(seg_model):
    with pytest.raises(ValueError, match="decoder_channels must be a positive int, got -4"):
        seg_model(decoder_channels=-4)


def test_processor_targets_feed_the_model(seg_model):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(2)]
    maps = [rng.integers(0, 2, (40, 60)) for _ in range(2)]
    maps[0][:5] = 255
    batch = ModSquadImageProcessor(size={"height": 32, "width": 48})(
        images, segmentation_maps=maps, return_tensors="pt"
    )
    outputs = seg_model()(**batch)
    assert batch["labels"].shape == (2, 32, 48) and outputs.logits.shape == (2, 2, 16, 24)
    assert torch.isfinite(outputs.loss)


def test_post_process_resizes_then_takes_argmax():
    processor = ModSquadImageProcessor()
    logits = torch.randn(2, 3, 8, 8)
    outputs = ModSquadSemanticSegmenterOutput(logits=logits)
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(50, 70), (20, 10)])
    assert [tuple(m.shape) for m in maps] == [(50, 70), (20, 10)]
    assert all(m.dtype == torch.long for m in maps)
    expected = nn.functional.interpolate(logits[1:], size=(20, 10), mode="bilinear", align_corners=False)
    assert torch.equal(maps[1], expected[0].argmax(0))
    native = processor.post_process_semantic_segmentation(outputs)
    assert torch.equal(native[0], logits[0].argmax(0))
    with_scores = processor.post_process_semantic_segmentation(
        outputs, target_sizes=torch.tensor([[16, 16], [4, 4]]), return_segmentation_scores=True
    )
    assert with_scores[0].segmentation_scores.shape == (3, 16, 16)
    with pytest.raises(ValueError, match="got 1 target sizes for a batch of 2"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(4, 4)])
    with pytest.raises(ValueError, match=r"target_sizes\[1\] must be a \(height, width\) pair"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(4, 4), (4, 0)])


@pytest.mark.slow
def test_learns_to_segment_shapes(one_thread, seg_task, tiny_config, bright_shapes):
    pixel_values, masks = shapes_dataset(bright_shapes, num_images=8)
    model = ModSquadForSemanticSegmentation(tiny_config([dict(seg_task, decoder_channels=32)]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss = model(pixel_values, labels=masks).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(pixel_values).logits
    predicted = ModSquadImageProcessor().post_process_semantic_segmentation(
        ModSquadSemanticSegmenterOutput(logits=logits), target_sizes=[(32, 32)] * len(masks)
    )
    predicted = torch.stack(predicted)
    ious = [((predicted == c) & (masks == c)).sum() / ((predicted == c) | (masks == c)).sum() for c in (0, 1)]
    assert sum(ious) / 2 > 0.9, ious


@pytest.mark.parametrize("checkpointed", [False, True], ids=["whole batch", "one image at a time"])
def test_training_loss_matches_plain_cross_entropy_with_and_without_checkpointing(
    checkpointed, monkeypatch, count_checkpoints
):
    """With label maps past `CHECKPOINT_ACTIVATION_BYTES` (0 here), the label-resolution logits exist for one image
    at a time (activation checkpointing); either way the loss and its gradient equal the plain
    upsample-then-cross-entropy, ignored pixels and an image without labelled pixels included."""
    calls = count_checkpoints(modsquad.model.head_segmentation)
    if checkpointed:
        monkeypatch.setattr(modsquad.model.feature_pyramid, "CHECKPOINT_ACTIVATION_BYTES", 0)
    torch.manual_seed(0)
    logits = torch.randn(4, 5, 8, 8, requires_grad=True)
    labels = torch.randint(0, 5, (4, 32, 32))
    labels[0, :10] = 255
    labels[2] = 255
    loss = segmentation_loss(logits, labels, ignore_index=255)
    (grad,) = torch.autograd.grad(loss, logits)
    assert len(calls) == (4 if checkpointed else 0)
    upsampled = nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    reference = nn.functional.cross_entropy(upsampled, labels, ignore_index=255)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(grad, reference_grad)
