"""Semantic segmentation head: feature pyramid, FPN/UPerNet-style decoder, per-pixel classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import SemanticSegmenterOutput

from .feature_pyramid import (
    ModSquadChannelLayerNorm,
    ModSquadFeaturePyramid,
    checkpoint_per_image,
    dense_head_channels,
    feature_hidden_state_indices,
)
from .modeling_heads import ModSquadForTask, TaskHead, register_task_head, routing_fields


@dataclass
class ModSquadSemanticSegmenterOutput(SemanticSegmenterOutput):
    r"""
    [`SemanticSegmenterOutput`] plus the routing information of the backbone.

    Args:
        loss (`torch.FloatTensor`, *optional*): cross-entropy plus the backbone's `aux_loss`, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels, logits_height, logits_width)`):
            per-pixel class scores at the finest pyramid level, stride `patch_size / 4` (a quarter of the input
            resolution for 16-pixel patches; see [`pyramid_scales`]). As in SegFormer they are not upsampled: the
            loss and [`ModSquadImageProcessor.post_process_semantic_segmentation`] upsample them.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        attentions (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        aux_loss (`torch.FloatTensor`): the backbone's per-batch auxiliary router loss (already in `loss`).
        router_logits, router_probs, expert_indices: see [`ModSquadModelOutput`].
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None


def conv_norm_act(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution, channel LayerNorm (batch-size independent, unlike BatchNorm), ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        ModSquadChannelLayerNorm(out_channels),
        nn.ReLU(),
    )


def resize_to(features: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize of `(batch, channels, h, w)` features to `size` (a no-op when already there)."""
    if features.shape[-2:] == tuple(size):
        return features
    return nn.functional.interpolate(features, size=tuple(size), mode="bilinear", align_corners=False)


class ModSquadSegmentationDecoder(nn.Module):
    """FPN top-down pathway (coarse levels upsampled and added to finer ones, each sum smoothed by a 3x3 conv), then
    the UPerNet fusion: every level upsampled to the finest one, concatenated, fused by a 3x3 conv.

    Args:
        channels (`int`): channels of the pyramid levels and of the decoder.
        num_levels (`int`): number of pyramid levels.
    """

    def __init__(self, channels: int, num_levels: int):
        super().__init__()
        self.smooth = nn.ModuleList(conv_norm_act(channels, channels) for _ in range(num_levels))
        self.fuse = conv_norm_act(num_levels * channels, channels)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Pyramid levels (finest first, `(batch, channels, h_k, w_k)`) -> `(batch, channels, h_0, w_0)`."""
        top_down = [levels[-1]]
        for level in reversed(levels[:-1]):
            top_down.insert(0, level + resize_to(top_down[0], level.shape[-2:]))
        smoothed = [smooth(features) for smooth, features in zip(self.smooth, top_down)]
        size = smoothed[0].shape[-2:]
        return self.fuse(torch.cat([resize_to(features, size) for features in smoothed], dim=1))


@register_task_head
class ModSquadSemanticSegmentationHead(TaskHead):
    """Feature pyramid over `config.feature_layers`, FPN/UPerNet decoder and a 1x1 classifier.

    Task-entry options: `decoder_channels` (default 256), `ignore_index` (default 255).
    Labels: class-id maps `(batch_size, height, width)` (int), any resolution (usually the input's); pixels equal
    to `ignore_index` do not count.
    """

    task_type = "semantic-segmentation"
    auto_class = "AutoModelForSemanticSegmentation"
    pipeline_tag = "image-segmentation"
    metrics = ("mean_iou", "overall_accuracy")

    def __init__(self, config, task: dict):
        super().__init__(config, task)
        self.num_labels = task["num_labels"]
        self.ignore_index = task["ignore_index"]
        channels = dense_head_channels(task)
        self.pyramid = ModSquadFeaturePyramid(config, channels)
        self.hidden_state_indices = feature_hidden_state_indices(config, self.pyramid.level_layers)
        self.decoder = ModSquadSegmentationDecoder(channels, len(self.pyramid.scales))
        self.classifier = nn.Conv2d(channels, self.num_labels, kernel_size=1)

    def forward(self, backbone_output, pixel_values: torch.Tensor) -> torch.Tensor:
        levels = self.pyramid(backbone_output, pixel_values.shape[-2:])
        return self.classifier(self.decoder(levels))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = torch.as_tensor(labels, device=logits.device)
        check_segmentation_labels(labels, logits.shape[0], self.num_labels, self.ignore_index)
        return segmentation_loss(logits, labels, self.ignore_index)

    def loss_count(self, labels) -> torch.Tensor:
        """Labelled pixels (the cross-entropy is their mean)."""
        return (torch.as_tensor(labels) != self.ignore_index).sum().float()

    def build_output(self, loss, logits, backbone_output) -> ModSquadSemanticSegmenterOutput:
        return ModSquadSemanticSegmenterOutput(
            loss=loss,
            logits=logits,
            hidden_states=backbone_output.hidden_states,
            attentions=backbone_output.attentions,
            **routing_fields(backbone_output),
        )


def check_segmentation_labels(
    labels: torch.Tensor, batch_size: int, num_labels: int, ignore_index: int
) -> None:
    """Raises a ValueError unless `labels` are integer maps `(batch_size, H, W)` with values in `[0, num_labels)` or
    `ignore_index`."""
    if labels.ndim != 3 or labels.shape[0] != batch_size:
        raise ValueError(
            f"segmentation labels must have shape (batch_size={batch_size}, height, width), got {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"segmentation labels must be integer class ids, got dtype {labels.dtype}")
    valid = ((labels >= 0) & (labels < num_labels)) | (labels == ignore_index)
    if not bool(valid.all()):
        bad = labels[~valid].unique()
        shown = bad[:10].tolist()
        raise ValueError(
            f"segmentation labels hold values {shown}{' ...' if bad.numel() > 10 else ''}; accepted are class ids "
            f"in [0, {num_labels}) and the ignore index {ignore_index}"
        )


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Cross-entropy of `logits` `(batch, num_labels, h, w)` upsampled (bilinear) to the size of `labels`
    `(batch, H, W)`, ignoring `ignore_index` pixels. A batch with only ignored pixels gives a zero loss (with a
    gradient path), not NaN.

    While training with large label maps (see [`checkpoint_per_image`]), the upsampling and the cross-entropy run one
    image at a time under activation checkpointing: the label-resolution logits, their log-softmax and the gradients
    of both (each `num_labels x H x W` per image; four such tensors for the whole batch at once otherwise, about 1 GB
    for 8 ADE20K images at 224 px) exist for one image at a time, and the backward recomputes them from the small
    `(h, w)` logits. The value is the same mean over labelled pixels; only the order of the float sums differs.
    """
    labelled = labels != ignore_index
    if not bool(labelled.any()):
        return resize_to(logits, labels.shape[-2:]).sum() * 0.0
    labels = labels.long()
    # The upsampled logits and their log-softmax, for the batch.
    activation_bytes = 2 * labels.numel() * logits.shape[1] * logits.element_size()
    if not checkpoint_per_image(logits, activation_bytes):
        return nn.functional.cross_entropy(
            resize_to(logits, labels.shape[-2:]), labels, ignore_index=ignore_index
        )
    summed = sum(
        checkpoint(
            _upsampled_cross_entropy_sum,
            logits[i : i + 1],
            labels[i : i + 1],
            ignore_index,
            use_reentrant=False,
        )
        for i in range(logits.shape[0])
    )
    return summed / labelled.sum()


def _upsampled_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """Summed cross-entropy of `logits` upsampled to the size of `labels` (see [`segmentation_loss`])."""
    upsampled = resize_to(logits, labels.shape[-2:])
    return nn.functional.cross_entropy(upsampled, labels, ignore_index=ignore_index, reduction="sum")


class ModSquadForSemanticSegmentation(ModSquadForTask):
    """Mod-Squad backbone with the segmentation head of one task; returns [`ModSquadSemanticSegmenterOutput`].

    Args:
        config ([`ModSquadConfig`]): model configuration.
        task (`str`, *optional*): which semantic-segmentation task of the config to serve (needed only when there
            are several).

    Example:

    ```python
    >>> model = ModSquadForSemanticSegmentation(config)
    >>> outputs = model(pixel_values, labels=label_maps)  # label_maps: (batch, height, width) int64
    >>> maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(480, 640)])
    ```"""

    head_class = ModSquadSemanticSegmentationHead


__all__ = [
    "ModSquadForSemanticSegmentation",
    "ModSquadSegmentationDecoder",
    "ModSquadSemanticSegmentationHead",
    "ModSquadSemanticSegmenterOutput",
    "check_segmentation_labels",
    "segmentation_loss",
]
