"""Monocular depth head: DPT-like reassemble (the feature pyramid) and residual fusion, trained with the
scale-invariant log loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import DepthEstimatorOutput

from .configuration_modsquad import task_option
from .feature_pyramid import (
    ModSquadFeaturePyramid,
    checkpoint_per_image,
    dense_head_channels,
    feature_hidden_state_indices,
)
from .modeling_heads import ModSquadForTask, TaskHead, register_task_head, routing_fields

# Hidden width of the last full-resolution convolution (DPT's value).
DEPTH_HEAD_HIDDEN = 32
# Predictions are clamped to this before the log in the loss: a saturated sigmoid must not give log(0).
MIN_DEPTH = 1e-6


@dataclass
class ModSquadDepthEstimatorOutput(DepthEstimatorOutput):
    r"""
    [`DepthEstimatorOutput`] plus the routing information of the backbone.

    Args:
        loss (`torch.FloatTensor`, *optional*): scale-invariant log loss plus the backbone's `aux_loss`, when
            `labels` are given.
        predicted_depth (`torch.FloatTensor` of shape `(batch_size, height, width)`): depth at the input resolution,
            in `(0, max_depth)`, in the unit of the training labels (metres by convention).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        attentions (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        aux_loss (`torch.FloatTensor`): the backbone's per-batch auxiliary router loss (already in `loss`).
        router_logits, router_probs, expert_indices: see [`ModSquadModelOutput`].
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None


class ModSquadResidualConvUnit(nn.Module):
    """DPT's residual unit: `x + conv(relu(conv(relu(x))))` with 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.activation = nn.ReLU()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.conv2(self.activation(self.conv1(self.activation(features))))


class ModSquadFusionBlock(nn.Module):
    """One DPT fusion stage: refine the lateral level, add the (upsampled) coarser fused map, refine again, then a
    1x1 projection."""

    def __init__(self, channels: int):
        super().__init__()
        self.lateral = ModSquadResidualConvUnit(channels)
        self.refine = ModSquadResidualConvUnit(channels)
        self.projection = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, lateral: torch.Tensor, coarser: torch.Tensor | None) -> torch.Tensor:
        fused = self.lateral(lateral)
        if coarser is not None:
            # Resized to the lateral's exact size (not a fixed x2) so odd grids and pooled levels line up.
            fused = fused + nn.functional.interpolate(
                coarser, size=lateral.shape[-2:], mode="bilinear", align_corners=False
            )
        return self.projection(self.refine(fused))


@register_task_head
class ModSquadDepthEstimationHead(TaskHead):
    """Feature pyramid (DPT's reassemble), fusion from coarse to fine, and a head that upsamples to the input size
    and predicts `max_depth * sigmoid(x)`, a positive depth bounded like DPT's and GLPN's metric heads.

    Task-entry options: `decoder_channels` (default 256), `max_depth` (default 10.0, in label units),
    `silog_lambda` (default 0.5; see [`silog_loss`]).
    Labels: depth maps `(batch_size, height, width)` (float, any resolution, usually the input's); pixels that are
    0 or not finite are invalid and do not count.
    """

    task_type = "depth-estimation"
    auto_class = "AutoModelForDepthEstimation"
    pipeline_tag = "depth-estimation"
    metrics = ("delta1", "abs_rel")

    def __init__(self, config, task: dict):
        super().__init__(config, task)
        self.max_depth = float(task_option(task, "max_depth"))
        self.silog_lambda = float(task_option(task, "silog_lambda"))
        channels = dense_head_channels(task)
        self.pyramid = ModSquadFeaturePyramid(config, channels)
        self.hidden_state_indices = feature_hidden_state_indices(config, self.pyramid.level_layers)
        self.fusion = nn.ModuleList(ModSquadFusionBlock(channels) for _ in self.pyramid.scales)
        half = max(channels // 2, 1)
        self.head_in = nn.Conv2d(channels, half, kernel_size=3, padding=1)
        self.head_out = nn.Sequential(
            nn.Conv2d(half, DEPTH_HEAD_HIDDEN, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(DEPTH_HEAD_HIDDEN, 1, kernel_size=1),
        )

    def forward(self, backbone_output, pixel_values: torch.Tensor) -> torch.Tensor:
        levels = self.pyramid(backbone_output, pixel_values.shape[-2:])
        fused = None
        for block, level in zip(reversed(self.fusion), reversed(levels)):
            fused = block(level, fused)
        features = self.head_in(fused)
        size = tuple(pixel_values.shape[-2:])
        # The upsampled features and the hidden layer (before and after its ReLU), input-sized, for the batch.
        channels = features.shape[1] + 2 * DEPTH_HEAD_HIDDEN
        activation_bytes = features.shape[0] * channels * size[0] * size[1] * features.element_size()
        if not checkpoint_per_image(features, activation_bytes):
            return self._full_resolution_depth(features, size)
        # Large inputs, training: those layers run one image at a time under activation checkpointing; kept for the
        # batch, they cost more than the backbone's blocks at 224 px.
        return torch.cat(
            [
                checkpoint(self._full_resolution_depth, features[i : i + 1], size, use_reentrant=False)
                for i in range(features.shape[0])
            ]
        )

    def _full_resolution_depth(self, features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Upsamples the fused features to the input size and predicts `(batch, height, width)` depth."""
        features = nn.functional.interpolate(features, size=size, mode="bilinear", align_corners=False)
        return self.max_depth * torch.sigmoid(self.head_out(features).squeeze(1))

    def loss(self, predicted_depth: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=predicted_depth.device)
        check_depth_labels(labels, predicted_depth.shape[0])
        return silog_loss(predicted_depth, labels, self.silog_lambda)

    def loss_count(self, labels) -> torch.Tensor:
        """Images with a valid pixel (the loss is the mean of their per-image losses)."""
        labels = torch.as_tensor(labels)
        valid = (labels > 0) & torch.isfinite(labels)
        return valid.flatten(1).any(dim=1).sum().float()

    def build_output(self, loss, predicted_depth, backbone_output) -> ModSquadDepthEstimatorOutput:
        return ModSquadDepthEstimatorOutput(
            loss=loss,
            predicted_depth=predicted_depth,
            hidden_states=backbone_output.hidden_states,
            attentions=backbone_output.attentions,
            **routing_fields(backbone_output),
        )


def check_depth_labels(labels: torch.Tensor, batch_size: int) -> None:
    """Raises a ValueError unless `labels` are floating-point depth maps `(batch_size, H, W)` without negative
    values (0, NaN and +inf mark invalid pixels)."""
    if labels.ndim != 3 or labels.shape[0] != batch_size:
        raise ValueError(
            f"depth labels must have shape (batch_size={batch_size}, height, width), got {tuple(labels.shape)}"
        )
    if not labels.is_floating_point():
        raise ValueError(
            f"depth labels must be floating point (metres, 0 = invalid), got dtype {labels.dtype}; "
            "convert integer depth (e.g. millimetres) yourself"
        )
    negative = labels < 0
    if bool(negative.any()):
        raise ValueError(
            f"depth labels must be >= 0 (0 = invalid), got {int(negative.sum())} negative values "
            f"(min {labels[negative].min().item():.4g})"
        )


def silog_loss(
    predicted_depth: torch.Tensor, labels: torch.Tensor, silog_lambda: float = 0.5
) -> torch.Tensor:
    r"""
    Scale-invariant log loss (Eigen et al., 2014) over the valid pixels of each image, averaged over the images
    that have any: with `d = log(prediction) - log(label)`, `mean(d^2) - lambda * mean(d)^2`. `lambda = 1` ignores
    a global scale error entirely, `lambda = 0` is the plain squared log error; Eigen et al. use 0.5.

    Args:
        predicted_depth (`torch.Tensor` of shape `(batch_size, h, w)`): positive predictions; resized (bilinear) to
            the labels' size if they differ.
        labels (`torch.Tensor` of shape `(batch_size, H, W)`): depth, with 0 or non-finite values for invalid pixels.
        silog_lambda (`float`, *optional*, defaults to 0.5): weight of the scale-invariance term.

    Returns:
        `torch.Tensor`: scalar loss; zero (with a gradient path) when no pixel of the batch is valid.
    """
    if predicted_depth.shape[-2:] != labels.shape[-2:]:
        predicted_depth = nn.functional.interpolate(
            predicted_depth.unsqueeze(1), size=labels.shape[-2:], mode="bilinear", align_corners=False
        ).squeeze(1)
    valid = (labels > 0) & torch.isfinite(labels)
    counts = valid.sum(dim=(1, 2))
    has_pixels = counts > 0
    if not bool(has_pixels.any()):
        return predicted_depth.sum() * 0.0
    safe_labels = torch.where(valid, labels, torch.ones_like(labels)).to(predicted_depth.dtype)
    log_diff = torch.log(predicted_depth.clamp_min(MIN_DEPTH)) - torch.log(safe_labels)
    log_diff = torch.where(valid, log_diff, torch.zeros_like(log_diff))
    counts = counts.clamp_min(1).to(log_diff.dtype)
    mean = log_diff.sum(dim=(1, 2)) / counts
    mean_square = log_diff.square().sum(dim=(1, 2)) / counts
    per_image = mean_square - silog_lambda * mean.square()
    return per_image[has_pixels].mean()


class ModSquadForDepthEstimation(ModSquadForTask):
    """Mod-Squad backbone with the depth head of one task; returns [`ModSquadDepthEstimatorOutput`].

    The loss is the head's own [`silog_loss`]: Transformers has no depth loss to pick by class name (its fallback
    would be a causal-LM loss), and nothing here uses `self.loss_function`.

    Args:
        config ([`ModSquadConfig`]): model configuration.
        task (`str`, *optional*): which depth-estimation task of the config to serve (needed only when there are
            several).

    Example:

    ```python
    >>> model = ModSquadForDepthEstimation(config)
    >>> outputs = model(pixel_values, labels=depth_maps)  # depth_maps: (batch, height, width) float, 0 = invalid
    >>> depth = processor.post_process_depth_estimation(outputs, target_sizes=[(480, 640)])[0]["predicted_depth"]
    ```"""

    head_class = ModSquadDepthEstimationHead


__all__ = [
    "ModSquadDepthEstimationHead",
    "ModSquadDepthEstimatorOutput",
    "ModSquadForDepthEstimation",
    "ModSquadFusionBlock",
    "ModSquadResidualConvUnit",
    "check_depth_labels",
    "silog_loss",
]
