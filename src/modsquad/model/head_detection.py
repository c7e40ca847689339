"""Object detection head: an anchor-free, CenterNet / TTFNet-style dense head on the ViT's patch tokens.

The patch tokens of `config.feature_layers` are fused and upsampled to a stride-4 (by default) map; one branch
predicts a heatmap per class (object centres), the other the distances from each cell to the four box sides. Every
cell of the map is one query of the output, in the layout DETR-style post-processing expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.image_transforms import corners_to_center_format
from transformers.modeling_outputs import ModelOutput

from .configuration_modsquad import task_option
from .feature_pyramid import (
    ModSquadChannelLayerNorm,
    block_tokens,
    feature_hidden_state_indices,
    feature_norm,
    tokens_to_grid,
)
from .loss_detection import detection_loss
from .modeling_heads import ModSquadForTask, TaskHead, register_task_head, routing_fields

# Initial heatmap probability (RetinaNet's 0.01): nearly all of the num_labels x cells are empty, and a higher start
# (CenterNet's 0.1) lets their focal loss swamp the first steps of training with many classes.
HEATMAP_PRIOR = 0.01
# Box distances are exp(raw) cells; the clamp keeps exp finite for untrained or diverging weights.
MAX_LOG_DISTANCE = 8.0


@dataclass
class ModSquadObjectDetectionOutput(ModelOutput):
    r"""
    Output of [`ModSquadForObjectDetection`], laid out like DETR's so that `post_process_object_detection` and the
    object-detection pipeline read it: one query per cell of the output map.

    Args:
        loss (`torch.FloatTensor`, *optional*): detection loss plus the backbone's `aux_loss`, when `labels` are given.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*): the unweighted terms, `loss_heatmap` and `loss_giou`.
        logits (`torch.FloatTensor` of shape `(batch_size, num_queries, num_labels)`): per-class centre logits of
            every cell (`num_queries = map_height * map_width`, row-major); scores are their sigmoid.
        pred_boxes (`torch.FloatTensor` of shape `(batch_size, num_queries, 4)`): the box each cell predicts, as
            normalised `(center_x, center_y, width, height)` clipped to the image.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        attentions (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        aux_loss (`torch.FloatTensor`): the backbone's per-batch auxiliary router loss (already in `loss`).
        router_logits, router_probs, expert_indices: see [`ModSquadModelOutput`].
        heatmap (`torch.FloatTensor` of shape `(batch_size, num_labels, map_height, map_width)`): the same centre
            logits as `logits`, laid out on the output map, so that post-processing can keep only the local maxima
            of each class's heatmap (CenterNet's peak extraction).
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None
    # Last, so that the tuple positions of the fields above stay what they were.
    heatmap: torch.FloatTensor | None = None


class DetectionNeck(nn.Module):
    """Patch tokens of several blocks -> one `(batch, channels, map_h, map_w)` map at `output_stride`.

    The tokens of each feature block are layer-normed (the last block's by the backbone's final LayerNorm, see
    [`block_tokens`]), concatenated, projected by a 1x1 convolution, then doubled in
    resolution (bilinear + 3x3 convolution) until they reach the output stride.
    """

    def __init__(self, config, channels: int, output_stride: int):
        super().__init__()
        self.feature_layers = list(config.feature_layers)
        self.num_hidden_layers = config.num_hidden_layers
        self.patch_size = config.patch_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.output_stride = output_stride
        self.norms = nn.ModuleList(feature_norm(config, layer) for layer in self.feature_layers)
        self.projection = nn.Conv2d(config.hidden_size * len(self.feature_layers), channels, kernel_size=1)
        num_stages = math.ceil(math.log2(config.patch_size // output_stride))
        self.upsample = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=3, padding=1),
                ModSquadChannelLayerNorm(channels, eps=1e-6),
                nn.GELU(),
            )
            for _ in range(num_stages)
        )

    def forward(self, backbone_output, grid_size: tuple[int, int]) -> torch.Tensor:
        grids = [
            tokens_to_grid(
                norm(block_tokens(backbone_output, layer, self.num_hidden_layers)),
                grid_size,
                self.num_prefix_tokens,
            )
            for layer, norm in zip(self.feature_layers, self.norms)
        ]
        features = self.projection(torch.cat(grids, dim=1))
        scale = self.patch_size // self.output_stride
        target = (grid_size[0] * scale, grid_size[1] * scale)
        for index, stage in enumerate(self.upsample):
            last = index == len(self.upsample) - 1
            size = target if last else (features.shape[-2] * 2, features.shape[-1] * 2)
            features = nn.functional.interpolate(features, size=size, mode="bilinear", align_corners=False)
            features = stage(features)
        return features


def prediction_branch(channels: int, out_channels: int) -> nn.Sequential:
    """3x3 convolution + GELU + 1x1 convolution: CenterNet's per-output head."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        nn.GELU(),
        nn.Conv2d(channels, out_channels, kernel_size=1),
    )


@register_task_head
class ModSquadObjectDetectionHead(TaskHead):
    """Anchor-free detection head (CenterNet's heatmaps with TTFNet's Gaussian-weighted GIoU box regression).

    Options read from the task entry (all optional): `output_stride` (pixels per output cell, default 4; must
    divide `config.patch_size`), `head_channels` (width of the map, default 64), `heatmap_loss_coef` (default 1.0)
    and `box_loss_coef` (default 2.0).

    Labels: a list with one dict per image holding `class_labels` (`torch.LongTensor` of shape `(n,)`) and `boxes`
    (`torch.FloatTensor` of shape `(n, 4)`, normalised `(center_x, center_y, width, height)`), as
    [`ModSquadImageProcessor`] returns them for COCO `annotations`.
    """

    task_type = "object-detection"
    auto_class = "AutoModelForObjectDetection"
    pipeline_tag = "object-detection"
    metrics = ("map_50", "map")

    def __init__(self, config, task: dict):
        super().__init__(config, task)
        self.num_labels = task["num_labels"]
        # Validated by the config (output_stride divides patch_size).
        self.output_stride = task_option(task, "output_stride")
        channels = task_option(task, "head_channels")
        self.heatmap_loss_coef = float(task_option(task, "heatmap_loss_coef"))
        self.box_loss_coef = float(task_option(task, "box_loss_coef"))
        self.patch_size = config.patch_size
        self.neck = DetectionNeck(config, channels, self.output_stride)
        self.hidden_state_indices = feature_hidden_state_indices(config, self.neck.feature_layers)
        self.heatmap = prediction_branch(channels, self.num_labels)
        self.box_distances = prediction_branch(channels, 4)
        # Added to the heatmap logits rather than put in the bias, which the models' weight init zeroes.
        self.heatmap_prior_logit = math.log(HEATMAP_PRIOR / (1 - HEATMAP_PRIOR))

    def forward(self, backbone_output, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Heatmap logits `(batch, num_labels, map_h, map_w)` and unclipped normalised xyxy boxes
        `(batch, map_h * map_w, 4)` under `"heatmap"` and `"boxes_xyxy"`, plus the input `"image_size"`."""
        height, width = pixel_values.shape[-2:]
        grid = (height // self.patch_size, width // self.patch_size)
        features = self.neck(backbone_output, grid)
        heatmap = self.heatmap(features) + self.heatmap_prior_logit
        # Distances (in cells) from each cell centre to the left, top, right and bottom sides of its box.
        distances = self.box_distances(features).clamp(max=MAX_LOG_DISTANCE).exp()
        map_h, map_w = features.shape[-2:]
        stride = self.output_stride
        cols = (torch.arange(map_w, device=features.device, dtype=distances.dtype) + 0.5) * stride / width
        rows = (torch.arange(map_h, device=features.device, dtype=distances.dtype) + 0.5) * stride / height
        scale = distances.new_tensor([stride / width, stride / height])[None, :, None, None]
        near, far = distances[:, :2] * scale, distances[:, 2:] * scale
        centers = torch.stack(torch.broadcast_tensors(cols[None, :], rows[:, None]))[None]
        boxes = torch.cat((centers - near, centers + far), dim=1)
        return {
            "heatmap": heatmap,
            "boxes_xyxy": boxes.flatten(2).transpose(1, 2),
            "image_size": (height, width),
        }

    def loss(self, predictions: dict, labels) -> torch.Tensor:
        """Weighted heatmap focal + GIoU loss; its unweighted terms are left in `predictions["loss_dict"]` for the
        output. Raises a ValueError for malformed `labels` (see [`check_detection_labels`])."""
        loss, predictions["loss_dict"] = detection_loss(
            predictions["heatmap"],
            predictions["boxes_xyxy"],
            labels,
            stride=self.output_stride,
            image_size=predictions["image_size"],
            heatmap_loss_coef=self.heatmap_loss_coef,
            box_loss_coef=self.box_loss_coef,
        )
        return loss

    def loss_count(self, labels) -> torch.Tensor:
        """Objects (both loss terms are sums divided by the number of objects)."""
        return torch.tensor(float(sum(len(target["class_labels"]) for target in labels)))

    def build_output(self, loss, predictions: dict, backbone_output) -> ModSquadObjectDetectionOutput:
        return ModSquadObjectDetectionOutput(
            loss=loss,
            loss_dict=predictions.get("loss_dict"),
            logits=predictions["heatmap"].flatten(2).transpose(1, 2),
            pred_boxes=corners_to_center_format(predictions["boxes_xyxy"].clamp(0, 1)),
            hidden_states=backbone_output.hidden_states,
            attentions=backbone_output.attentions,
            **routing_fields(backbone_output),
            heatmap=predictions["heatmap"],
        )


class ModSquadForObjectDetection(ModSquadForTask):
    """Mod-Squad backbone with the detection head of one task; returns [`ModSquadObjectDetectionOutput`] (DETR's
    layout: `logits` and normalised cxcywh `pred_boxes` per query) and computes its own loss, never Transformers'
    DETR Hungarian loss.

    Args:
        config ([`ModSquadConfig`]): model configuration.
        task (`str`, *optional*): which object-detection task of the config to serve (needed only when there are
            several).

    Example:

    ```python
    >>> model = ModSquadForObjectDetection(config)
    >>> outputs = model(pixel_values, labels=[{"class_labels": ids, "boxes": cxcywh}, ...])
    >>> detections = image_processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=sizes)
    ```"""

    head_class = ModSquadObjectDetectionHead


__all__ = [
    "ModSquadForObjectDetection",
    "ModSquadObjectDetectionHead",
    "ModSquadObjectDetectionOutput",
]
