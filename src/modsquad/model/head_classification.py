"""Image classification head (single- and multi-label) on the pooled `[CLS]` token."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

from .modeling_heads import ModSquadForTask, TaskHead, register_task_head, routing_fields


@dataclass
class ModSquadImageClassifierOutput(ImageClassifierOutput):
    r"""
    [`ImageClassifierOutput`] plus the routing information of the backbone.

    Args:
        loss (`torch.FloatTensor`, *optional*): task loss plus the backbone's `aux_loss`, when `labels` are given.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`): scores before softmax (or sigmoid).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        attentions (`tuple(torch.FloatTensor)`, *optional*): see [`ModSquadModelOutput`].
        aux_loss (`torch.FloatTensor`): the backbone's per-batch auxiliary router loss (already in `loss`).
        router_logits, router_probs, expert_indices: see [`ModSquadModelOutput`].
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None


@register_task_head
class ModSquadImageClassificationHead(TaskHead):
    """Linear classifier on the final-normed tokens, pooled as the task entry's `pooling` says: the `[CLS]` token
    (`"cls"`, the default, as in ViT), the mean of the patch tokens (`"mean"`) or both concatenated (`"cls+mean"`,
    as DINOv2's classifier).

    Labels: class ids `(batch_size,)` (single-label), multi-hot `(batch_size, num_labels)` for tasks with
    `problem_type="multi_label_classification"`, or float targets `(batch_size,)` (one label) /
    `(batch_size, num_labels)` for `problem_type="regression"` (mean squared error, as in Transformers).
    """

    task_type = "image-classification"
    auto_class = "AutoModelForImageClassification"
    pipeline_tag = "image-classification"
    metrics = ("accuracy", "top5_accuracy")

    def __init__(self, config, task: dict):
        super().__init__(config, task)
        self.problem_type = task["problem_type"]
        self.pooling = task.get("pooling", "cls")
        self.num_prefix_tokens = config.num_prefix_tokens
        width = 2 * config.hidden_size if self.pooling == "cls+mean" else config.hidden_size
        self.classifier = nn.Linear(width, task["num_labels"])

    def forward(self, backbone_output, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return self.classifier(backbone_output.pooler_output)
        patch_mean = backbone_output.last_hidden_state[:, self.num_prefix_tokens :].mean(dim=1)
        if self.pooling == "mean":
            return self.classifier(patch_mean)
        return self.classifier(torch.cat([backbone_output.pooler_output, patch_mean], dim=-1))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, torch.as_tensor(labels, device=logits.device), self.problem_type)

    def build_output(self, loss, logits, backbone_output) -> ModSquadImageClassifierOutput:
        return ModSquadImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=backbone_output.hidden_states,
            attentions=backbone_output.attentions,
            **routing_fields(backbone_output),
        )


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """Cross-entropy for class ids `(batch,)`, binary cross-entropy for multi-hot `(batch, num_labels)` labels, or
    mean squared error for regression targets (`(batch,)` or `(batch, 1)` with one label)."""
    batch, num_labels = logits.shape
    if problem_type == "regression":
        expected = [(batch, num_labels)] + ([(batch,)] if num_labels == 1 else [])
        if tuple(labels.shape) not in expected:
            raise ValueError(
                f"regression labels must have shape {' or '.join(map(str, expected))}, got {tuple(labels.shape)}"
            )
        return nn.functional.mse_loss(logits.reshape(labels.shape), labels.to(logits.dtype))
    if problem_type == "multi_label_classification":
        if labels.shape != (batch, num_labels):
            raise ValueError(
                f"multi-label labels must be multi-hot of shape ({batch}, {num_labels}), got {tuple(labels.shape)}"
            )
        targets = labels.to(logits.dtype)
        outside = ~torch.isfinite(targets) | (targets < 0) | (targets > 1)
        if bool(outside.any()):
            raise ValueError(
                f"multi-label targets must be multi-hot (or soft) values in [0, 1], got "
                f"{targets[outside].unique()[:10].tolist()}"
            )
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)
    if labels.shape != (batch,) or labels.is_floating_point():
        raise ValueError(
            f"single-label labels must be integer class ids of shape ({batch},), got {labels.dtype} "
            f"of shape {tuple(labels.shape)}"
        )
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"class ids must be in [0, {num_labels}), got values {labels.unique().tolist()}")
    return nn.functional.cross_entropy(logits, labels)


class ModSquadForImageClassification(ModSquadForTask):
    """Mod-Squad backbone with the classification head of one task; returns [`ModSquadImageClassifierOutput`].

    Args:
        config ([`ModSquadConfig`]): model configuration.
        task (`str`, *optional*): which image-classification task of the config to serve (needed only when there
            are several).
    """

    head_class = ModSquadImageClassificationHead


__all__ = [
    "ModSquadForImageClassification",
    "ModSquadImageClassificationHead",
    "ModSquadImageClassifierOutput",
]
