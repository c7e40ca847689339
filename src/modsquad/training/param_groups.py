"""Optimizer parameter groups for fine-tuning a pretrained backbone: a learning rate for what is new (task heads,
routers, task tokens, loss log-variances), a lower one for what a pretrained checkpoint provides (the backbone:
embeddings, attention, norms, MLPs and the experts upcycled from them), optionally decayed layer by layer as in
BEiT / ViT fine-tuning, and weight decay only on matrices.

Layer ids follow BEiT: with `L` blocks, the patch embedding, `[CLS]` and position embeddings are layer 0, block `i` is
layer `i + 1`, the final norm layer `L + 1`; a backbone parameter of layer `l` gets
`backbone_learning_rate * layer_decay ** (L + 1 - l)`, so the final norm gets `backbone_learning_rate` and the
embeddings the smallest rate.

Experts count as backbone: upcycling initialises them from the pretrained MLPs (and attention), so a head-sized
learning rate would wash out what they were copied from; they still drift apart because routers send them
different tokens. Routers and task tokens are new even inside a block: they have no pretrained counterpart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..model.modeling_modsquad import ModSquadModel
from ..model.moe import ModSquadTaskRouter

# Parameters that weight decay should leave alone: biases, norms, learned tokens and embeddings, loss log-variances.
NO_DECAY = ("bias", "norm", "cls_token", "task_tokens", "position_embeddings", "log_vars")
# Parameters of the embeddings that a pretrained ViT provides (the task tokens are the ModSquad model's own).
PRETRAINED_EMBEDDINGS = ("patch_embeddings.", "cls_token", "position_embeddings")


def backbone_layer_ids(module: nn.Module) -> tuple[dict[str, int], int]:
    """The BEiT layer id of every backbone parameter of `module` that a pretrained checkpoint provides.

    Args:
        module (`nn.Module`): a module holding a [`ModSquadModel`] (the multi-task model, a head model, the
            training step), or the backbone itself.

    Returns:
        `(layer_ids, num_layers)`: parameter name (as `module.named_parameters()` gives it) -> layer id, for the
        pretrained backbone parameters only (routers, task tokens, heads and anything outside the backbone are left
        out: they are new); `num_layers` is `L + 1`, the id of the final norm. `({}, 0)` without a backbone.
    """
    found = next(((name, m) for name, m in module.named_modules() if isinstance(m, ModSquadModel)), None)
    if found is None:
        return {}, 0
    prefix, backbone = found
    prefix = f"{prefix}." if prefix else ""
    routers = {id(p) for m in backbone.modules() if isinstance(m, ModSquadTaskRouter) for p in m.parameters()}
    top = len(backbone.layers) + 1
    layer_ids = {}
    for name, param in backbone.named_parameters():
        if id(param) in routers:
            continue
        if name.startswith("embeddings."):
            if name.removeprefix("embeddings.").startswith(PRETRAINED_EMBEDDINGS):
                layer_ids[prefix + name] = 0
        elif name.startswith("layers."):
            layer_ids[prefix + name] = int(name.split(".")[1]) + 1
        elif name.startswith("layernorm."):
            layer_ids[prefix + name] = top
    return layer_ids, top


def learning_rate_groups(
    module: nn.Module,
    learning_rate: float,
    weight_decay: float,
    backbone_learning_rate: float | None = None,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """AdamW parameter groups: one per learning rate and weight-decay setting, in a fixed order.

    Args:
        module (`nn.Module`): the module to optimise (its trainable parameters).
        learning_rate (`float`): learning rate of the new parameters (and of all, by default).
        weight_decay (`float`): decay of matrices; biases, norms, tokens, embeddings and log-variances get none.
        backbone_learning_rate (`float`, *optional*): learning rate of the pretrained backbone (see the module
            docstring); defaults to `learning_rate`.
        layer_decay (`float`, *optional*, defaults to 1.0): BEiT layer decay of the backbone learning rate.

    Returns:
        `list[dict]`: groups with `params`, `lr`, `weight_decay`, `name` (`"all"` when every parameter has the one
        learning rate; otherwise `"new"` and `"backbone"`, or `"backbone.layer_XX"` per layer id with layer decay)
        and `layer_id` (`None` for `"all"` and `"new"`). New parameters come first, then the backbone by layer id;
        within each, the decayed group before the other. Empty groups are left out.
    """
    backbone_rate = learning_rate if backbone_learning_rate is None else backbone_learning_rate
    single = backbone_rate == learning_rate and layer_decay == 1.0
    layer_ids, top = ({}, 0) if single else backbone_layer_ids(module)
    buckets: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_ids.get(name)
        if single:
            label, rate, order = "all", learning_rate, -1
        elif layer is None:
            label, rate, order = "new", learning_rate, -1
        elif layer_decay == 1.0:
            label, rate, order = "backbone", backbone_rate, 0
        else:
            label, rate, order = (
                f"backbone.layer_{layer:02d}",
                backbone_rate * layer_decay ** (top - layer),
                layer,
            )
        decays = param.ndim > 1 and not any(key in name.lower() for key in NO_DECAY)
        bucket = buckets.setdefault(
            (order, not decays),
            {
                "params": [],
                "lr": rate,
                "weight_decay": weight_decay if decays else 0.0,
                "name": label,
                "layer_id": None if label in ("all", "new") else (layer if layer_decay != 1.0 else None),
            },
        )
        bucket["params"].append(param)
    return [buckets[key] for key in sorted(buckets)]


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rate of each named group of `optimizer` (decayed and not-decayed halves share it).
    Groups restored from a checkpoint written before groups had names are the two halves of `"all"`."""
    return {group.get("name", "all"): group["lr"] for group in optimizer.param_groups}


__all__ = ["NO_DECAY", "backbone_layer_ids", "group_learning_rates", "learning_rate_groups"]
