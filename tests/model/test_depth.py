"""Depth estimation: head shapes, SILog loss, label checks, post-processing, and that it learns (saving, loading and
the pipeline: tests/model/test_head_contract.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.modeling_outputs import DepthEstimatorOutput

import modsquad.model.feature_pyramid
import modsquad.model.head_depth
from modsquad import (
    ModSquadDepthEstimatorOutput,
    ModSquadForDepthEstimation,
    ModSquadImageProcessor,
)
from modsquad.model.head_depth import silog_loss


@pytest.fixture(name="depth_task")
def depth_task_fixture(all_tasks) -> dict:
    return dict(all_tasks[3], decoder_channels=16)


@pytest.fixture(name="depth_model")
def depth_model_fixture(tiny_config, depth_task):
    """The factory `depth_model(**task_options)`: a depth model of `depth_task` updated with the options."""

    def depth_model(**task_options) -> ModSquadForDepthEstimation:
        return ModSquadForDepthEstimation(tiny_config([dict(depth_task, **task_options)])).eval()

    return depth_model


def shapes_depth_dataset(
    bright_shapes, num_images: int = 16, size: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares and discs at 1.5 m in front of a plane sloping from 3 m (top) to 5 m (bottom), on a dark noisy
    background; a few invalid (0) pixels per depth map."""
    generator = torch.Generator().manual_seed(seed)
    images, shapes = bright_shapes(num_images, size, generator)
    yy = torch.arange(size).view(size, 1).expand(size, size)
    depth = (3.0 + 2.0 * yy / (size - 1)).expand(num_images, size, size).clone()
    depth[shapes] = 1.5
    labels = depth.clone()
    labels[torch.rand(labels.shape, generator=generator) < 0.05] = 0.0
    return (images - 0.5) / 0.5, labels


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40)])
def test_depth_at_input_resolution_positive_and_bounded(height, width, depth_model):
    model = depth_model(max_depth=4.0)
    outputs = model(torch.randn(2, 3, height, width), output_router_logits=True)
    assert isinstance(outputs, DepthEstimatorOutput) and isinstance(outputs, ModSquadDepthEstimatorOutput)
    assert outputs.predicted_depth.shape == (2, height, width)
    assert (outputs.predicted_depth > 0).all() and (outputs.predicted_depth < 4.0).all()
    assert outputs.loss is None and outputs.aux_loss is not None and len(outputs.router_logits) == 2


def test_silog_is_zero_for_a_perfect_prediction_and_measures_scale_errors():
    labels = 1.0 + 4.0 * torch.rand(2, 8, 8)
    assert silog_loss(labels, labels).item() == pytest.approx(0.0, abs=1e-6)
    # off by a global factor 2: fully scale invariant with lambda 1, (1 - lambda) * log(2)^2 otherwise
    assert silog_loss(2 * labels, labels, silog_lambda=1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert silog_loss(2 * labels, labels, silog_lambda=0.5).item() == pytest.approx(0.5 * math.log(2) ** 2)
    # a non-uniform error is not forgiven even with lambda 1
    noisy = labels * torch.exp(0.1 * torch.randn_like(labels))
    assert silog_loss(noisy, labels, silog_lambda=1.0) > 1e-3


def test_silog_ignores_invalid_pixels_and_empty_images():
    labels = 1.0 + torch.rand(2, 8, 8)
    prediction = labels.clone()
    invalid = torch.zeros_like(labels, dtype=torch.bool)
    invalid[0, :3] = True
    labels[0, 0] = 0.0
    labels[0, 1] = float("nan")
    labels[0, 2] = float("inf")
    prediction[invalid] = 100.0  # wildly wrong, but only where the label is invalid
    assert silog_loss(prediction, labels).item() == pytest.approx(0.0, abs=1e-6)
    # an image without valid pixels drops out of the mean instead of dividing by zero
    labels[1] = 0.0
    prediction[0, 5] *= 2
    expected = silog_loss(prediction[:1], labels[:1])
    torch.testing.assert_close(silog_loss(prediction, labels), expected)
    empty = prediction.clone().requires_grad_()
    loss = silog_loss(empty, torch.zeros_like(labels))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad is not None


def test_silog_resizes_predictions_to_the_labels():
    labels = torch.full((1, 16, 16), 2.0)
    assert silog_loss(torch.full((1, 8, 8), 2.0), labels).item() == pytest.approx(0.0, abs=1e-6)


def test_model_loss_is_silog_plus_aux_loss(depth_model):
    model = depth_model(silog_lambda=0.25)
    pixel_values, labels = torch.randn(2, 3, 32, 32), 1.0 + torch.rand(2, 32, 32)
    outputs = model(pixel_values, labels=labels, output_router_logits=True)
    expected = silog_loss(outputs.predicted_depth, labels, silog_lambda=0.25) + outputs.aux_loss
    torch.testing.assert_close(outputs.loss, expected)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.ones(1, 32, 32, dtype=torch.long), "must be floating point .* got dtype torch.int64"),
        (-torch.ones(1, 32, 32), "must be >= 0 .* 1024 negative values"),
        (torch.ones(1, 32), r"shape \(batch_size=1, height, width\), got \(1, 32\)"),
        (torch.ones(3, 32, 32), r"got \(3, 32, 32\)"),
    ],
)
def test_bad_labels_raise(labels, message, depth_model):
    with pytest.raises(ValueError, match=message):
        depth_model()(torch.randn(1, 3, 32, 32), labels=labels)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_depth": 0}, "max_depth must be a positive number, got 0"),
        ({"max_depth": "far"}, "max_depth must be a positive number, got 'far'"),
        ({"silog_lambda": 1.5}, r"silog_lambda must be a number in \[0, 1\], got 1.5"),
        ({"decoder_channels": 0}, "decoder_channels must be a positive int, got 0"),
    ],
)
def test_bad_task_options_raise(options, message, depth_model):
    with pytest.raises(ValueError, match=message):
        depth_model(**options)


def test_processor_targets_feed_the_model(depth_model):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(2)]
    depth_maps = [rng.uniform(0.5, 8.0, (40, 60)).astype(np.float32) for _ in range(2)]
    depth_maps[1][:, :10] = 0.0  # invalid
    batch = ModSquadImageProcessor(size={"height": 32, "width": 48})(
        images, depth_maps=depth_maps, return_tensors="pt"
    )
    outputs = depth_model()(**batch)
    assert batch["labels"].dtype == torch.float32 and outputs.predicted_depth.shape == (2, 32, 48)
    assert torch.isfinite(outputs.loss)


def test_post_process_depth_estimation_sizes():
    processor = ModSquadImageProcessor()
    outputs = ModSquadDepthEstimatorOutput(predicted_depth=1.0 + torch.rand(2, 32, 32))
    results = processor.post_process_depth_estimation(outputs, target_sizes=[(50, 70), (16, 8)])
    assert [tuple(r["predicted_depth"].shape) for r in results] == [(50, 70), (16, 8)]
    # bilinear resizing cannot leave the range of the input (bicubic could overshoot below zero)
    assert all(r["predicted_depth"].min() >= 1.0 for r in results)
    native = processor.post_process_depth_estimation(outputs)
    assert torch.equal(native[1]["predicted_depth"], outputs.predicted_depth[1])
    with pytest.raises(ValueError, match="got 3 target sizes for a batch of 2"):
        processor.post_process_depth_estimation(outputs, target_sizes=[(4, 4)] * 3)


@pytest.mark.slow
def test_learns_synthetic_depth(one_thread, depth_task, tiny_config, bright_shapes):
    pixel_values, labels = shapes_depth_dataset(bright_shapes, num_images=8)
    # The scene spans 1.5-5 m: a max_depth near that range is what a user would set, and it learns faster than 10.
    model = ModSquadForDepthEstimation(tiny_config([dict(depth_task, decoder_channels=32, max_depth=6.0)]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(120):
        loss = model(pixel_values, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(pixel_values).predicted_depth
    valid = labels > 0
    abs_rel = ((predicted - labels).abs() / labels)[valid].mean()
    assert abs_rel < 0.1, abs_rel


def test_large_training_inputs_checkpoint_the_full_resolution_layers_without_changing_values_or_gradients(
    depth_model, monkeypatch, count_checkpoints
):
    """While training on inputs whose full-resolution activations exceed `CHECKPOINT_ACTIVATION_BYTES`, those layers
    run one image at a time under activation checkpointing; the depth and every gradient equal those computed
    without. Smaller inputs (the threshold as shipped, for these 32 px images) keep the whole-batch path."""
    torch.manual_seed(0)
    model = depth_model().train()
    pixel_values = torch.randn(3, 3, 32, 32)
    labels = 0.5 + 4 * torch.rand(3, 32, 32)
    calls = count_checkpoints(modsquad.model.head_depth)

    def depth_and_grads():
        model.zero_grad()
        outputs = model(pixel_values=pixel_values, labels=labels)
        outputs.loss.backward()
        return outputs.predicted_depth.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    reference_depth, reference_grads = depth_and_grads()
    assert calls == []
    monkeypatch.setattr(modsquad.model.feature_pyramid, "CHECKPOINT_ACTIVATION_BYTES", 0)
    depth, grads = depth_and_grads()
    assert len(calls) == 3  # one call per image
    torch.testing.assert_close(depth, reference_depth)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)
