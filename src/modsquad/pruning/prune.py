"""Per-task expert pruning: cut the experts a task does not use out of a Mod-Squad model, leaving a standalone,
smaller `ModSquadFor<Type>` for that task that computes the same outputs.

A task's router picks its top-k experts among the experts it may route to. Dropping experts that the router never
picks on some data changes neither the picks (top-k over a subset that still holds every winner) nor, with
`norm_topk_prob=True` (the default), their weights (`p_i / sum_topk p_j` does not depend on the softmax
denominator). So with `threshold=0` the pruned model reproduces the full model on that data up to float rounding;
[`compare_pruned_outputs`] measures it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from ..model.configuration_modsquad import ModSquadConfig
from ..model.modeling_heads import ModSquadForTask, task_head_class
from .usage import ExpertUsage, RouterSlot, pixel_batches, router_layout, router_positions

logger = logging.getLogger(__name__)

EXPERT_TENSORS = {
    "mlp": ("experts.up_proj", "experts.up_proj_bias", "experts.down_proj", "experts.down_proj_bias"),
    "attention": ("q_proj", "q_proj_bias", "o_proj", "o_proj_bias"),
}
# Output fields that describe routing, which pruning renumbers, rather than predictions.
# Threshold of `modsquad prune` and the demo: an expert that gets at most 2% of a task's selections in a router is
# dropped for that task. (`prune_for_task` itself defaults to 0, which keeps the outputs on the calibration data.)
DEFAULT_PRUNE_THRESHOLD = 0.02
ROUTING_FIELDS = ("loss", "aux_loss", "router_logits", "router_probs", "expert_indices")


def select_experts(
    counts: torch.Tensor, threshold: float, min_experts: int, routable: int | None = None
) -> list[int]:
    """The experts a task keeps in one router.

    Args:
        counts (`torch.Tensor` of shape `(num_experts,)`): how often the task chose each expert.
        threshold (`float`): keep the experts whose share of the selections is above it (0 keeps every expert
            chosen at least once).
        min_experts (`int`): keep at least this many, padding with the most used (then lowest-index) experts.
        routable (`int`, *optional*): the task may route to the first `routable` experts only (its
            `routable_experts` limit); the others are never kept.

    Returns:
        `list[int]`: kept expert indices, increasing.
    """
    routable = counts.shape[0] if routable is None else routable
    if bool((counts[routable:] > 0).any()):
        raise ValueError(
            f"usage counts experts {torch.nonzero(counts[routable:]).flatten().add(routable).tolist()} that the "
            f"task cannot route to (it may use only the first {routable}); the usage belongs to another model"
        )
    total = counts.sum()
    if total <= 0:
        raise ValueError(
            "the usage has no selections for this router; collect it on some data of the task first"
        )
    shares = counts[:routable] / total
    kept = [e for e in range(routable) if shares[e] > threshold]
    if len(kept) < min_experts:
        # Ties (unused experts) resolve to the lower index, so the choice is deterministic.
        spare = sorted((e for e in range(routable) if e not in kept), key=lambda e: (-float(counts[e]), e))
        kept += spare[: min_experts - len(kept)]
    return sorted(kept)


def _pruned_config(
    config: ModSquadConfig,
    entry: dict,
    kept: list[list[int]],
    layout: list[RouterSlot],
    parent_name: str,
    parent_parameters: int,
) -> ModSquadConfig:
    mlp = [k for k, s in zip(kept, layout) if s.kind == "mlp"]
    attention = [k for k, s in zip(kept, layout) if s.kind == "attention"]
    # Indices refer to the experts of the original, unpruned model even when pruning a pruned model.
    if config.pruned_experts is not None:
        mlp_original = [[parent[i] for i in layer] for parent, layer in zip(config.pruned_experts, mlp)]
    else:
        mlp_original = mlp
    if config.pruned_attention_experts is not None:
        attention_original = [
            [parent[i] for i in layer] for parent, layer in zip(config.pruned_attention_experts, attention)
        ]
    else:
        attention_original = attention
    pruned_from = config.pruned_from or {
        "name_or_path": parent_name,
        "tasks": list(config.task_names),
        "num_experts": config.experts_per_layer,
        "attention_num_experts": config.attention_experts_per_layer or None,
        "num_parameters": parent_parameters,
    }
    # The only task may route to every expert it kept: its routable limits are spent.
    task = {k: v for k, v in entry.items() if k not in ("routable_experts", "routable_attention_experts")}
    # Top-level labels, names and the served task belong to the parent; the single-task config derives its own.
    dropped = {
        "architectures",
        "auto_map",
        "id2label",
        "label2id",
        "problem_type",
        "head_task",
        "_name_or_path",
    }
    fields = {k: v for k, v in config.to_dict().items() if k not in dropped}
    fields.update(
        tasks=[task],
        num_experts=[len(layer) for layer in mlp],
        attention_num_experts=[len(layer) for layer in attention] if attention else None,
        pruned_experts=mlp_original,
        pruned_attention_experts=attention_original if attention else None,
        pruned_from=pruned_from,
    )
    pruned = ModSquadConfig.from_dict(fields)
    pruned._attn_implementation = config._attn_implementation
    pruned._experts_implementation = config._experts_implementation
    return pruned


def _pruned_state_dict(
    source: dict[str, torch.Tensor],
    target_keys: Iterable[str],
    layout: list[RouterSlot],
    kept: list[list[int]],
    task_id: int,
) -> dict[str, torch.Tensor]:
    """The parent's tensors cut to the pruned model's keys: that task's token and router rows, the kept experts."""
    slices: dict[str, tuple[str, torch.Tensor]] = {
        "modsquad.embeddings.task_tokens": ("task", torch.tensor([]))
    }
    for slot, experts in zip(layout, kept):
        index = torch.tensor(experts, dtype=torch.long)
        module = f"modsquad.layers.{slot.block}.{slot.kind}."
        slices[module + "router.weight"] = ("router", index)
        for name in EXPERT_TENSORS[slot.kind]:
            slices[module + name] = ("experts", index)
    state = {}
    for key in target_keys:
        if key not in source:
            raise ValueError(
                f"the model to prune has no tensor {key!r}; is it a ModSquad head or multi-task model?"
            )
        tensor = source[key]
        kind, index = slices.get(key, ("copy", None))
        if kind == "task":
            tensor = tensor[task_id : task_id + 1]
        elif kind == "router":
            tensor = tensor[task_id].index_select(0, index.to(tensor.device)).unsqueeze(0)
        elif kind == "experts":
            tensor = tensor.index_select(0, index.to(tensor.device))
        state[key] = tensor
    return state


def prune_for_task(
    model: torch.nn.Module,
    task: str | int,
    usage: ExpertUsage,
    threshold: float = 0.0,
    min_experts: int | None = None,
) -> ModSquadForTask:
    """A standalone single-task model holding only the experts `task` uses.

    Every MoE router keeps the experts whose share of the task's selections in `usage` is above `threshold`
    (at least `min_experts`, padded with the most used); experts keep their relative order. The result is the task
    type's `ModSquadFor<Type>` with `config.tasks = [task]`, per-layer `num_experts` (and `attention_num_experts`)
    lists, that task's token, router rows (`[1, kept, hidden]`) and head, and `config.pruned_experts` /
    `pruned_attention_experts` / `pruned_from` recording where it came from. It saves, loads (`from_pretrained`,
    Auto classes) and runs in pipelines like any ModSquad model.

    With `threshold=0` and the usage collected on some data, its outputs on that data equal the full model's (up to
    float rounding) when `config.norm_topk_prob` is True; without top-k renormalisation the expert weights depend
    on the dropped experts' router logits and a warning is logged.

    Args:
        model: a [`ModSquadForMultiTask`] or a `ModSquadFor<Type>` (a pruned model can be pruned further).
        task (`str` or `int`): the task to keep.
        usage ([`ExpertUsage`]): that task's usage on this model, from [`collect_expert_usage`] or
            [`ExpertUsageTracker.usage`].
        threshold (`float`, *optional*, defaults to 0.0): minimum share of a router's selections, in `[0, 1)`.
        min_experts (`int`, *optional*): experts kept at least per router; defaults to the router's top-k and may
            not be below it.

    Returns:
        `ModSquadFor<Type>` in the parent's dtype, device and train/eval mode.

    Example:

    ```python
    >>> usage = collect_expert_usage(model, calibration_loader, task="seg")
    >>> seg_model = prune_for_task(model, "seg", usage)  # a ModSquadForSemanticSegmentation
    >>> seg_model.save_pretrained("seg-model")
    ```"""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a float in [0, 1), got {threshold!r}")
    if not isinstance(usage, ExpertUsage):
        raise ValueError(
            f"usage must be an ExpertUsage (see collect_expert_usage), got {type(usage).__name__}"
        )
    config = getattr(model, "config", None)
    if not isinstance(config, ModSquadConfig) or not hasattr(model, "heads"):
        raise ValueError(
            f"prune_for_task takes a ModSquadForMultiTask or ModSquadFor<Type> model (one with heads), got "
            f"{type(model).__name__}"
        )
    entry = config.get_task(task)
    name, task_id = entry["name"], config.task_index(task)
    served = getattr(model, "task", None)
    if isinstance(served, str) and served != name:
        raise ValueError(f"this model serves task {served!r}, got task={task!r}")
    if usage.task != name:
        raise ValueError(f"usage is of task {usage.task!r}, not of {name!r}")
    usage.check_layout(config)
    layout = router_layout(config)
    if not layout:
        raise ValueError("the model has no MoE blocks (moe_layers is empty): there are no experts to prune")
    top_k = {"mlp": config.num_experts_per_tok, "attention": config.attention_experts_per_tok}
    if min_experts is not None and (
        isinstance(min_experts, bool)
        or not isinstance(min_experts, int)
        or min_experts < max(top_k[s.kind] for s in layout)
    ):
        raise ValueError(
            f"min_experts must be an int >= the experts per token of every router "
            f"({max(top_k[s.kind] for s in layout)}), got {min_experts!r}"
        )
    routable = {
        "mlp": [limits[task_id] for limits in config.routable_experts_per_layer],
        "attention": [limits[task_id] for limits in config.routable_attention_experts_per_layer],
    }
    position = router_positions(config)
    kept = []
    for slot, router in zip(layout, usage.routers):
        limit = routable[slot.kind][position[slot.kind][slot.block]]
        floor = min(limit, min_experts if min_experts is not None else top_k[slot.kind])
        try:
            kept.append(select_experts(router.counts, threshold, floor, limit))
        except ValueError as error:
            raise ValueError(f"task {name!r}, {slot.name}: {error}") from error
    if not config.norm_topk_prob and any(len(k) < s.num_experts for k, s in zip(kept, layout)):
        logger.warning(
            "norm_topk_prob=False: the pruned model's expert weights are renormalised over the kept experts only, "
            "so its outputs differ from the full model's"
        )

    parameter = next(model.parameters())
    parent_name = str(getattr(model, "name_or_path", "") or config._name_or_path or "")
    pruned_config = _pruned_config(
        config, entry, kept, layout, parent_name, sum(p.numel() for p in model.parameters())
    )
    pruned = task_head_class(entry["type"]).model_class(pruned_config)
    state = _pruned_state_dict(model.state_dict(), pruned.state_dict().keys(), layout, kept, task_id)
    pruned.load_state_dict(state, strict=True)
    return pruned.to(device=parameter.device, dtype=parameter.dtype).train(model.training)


# ------------------------------------------------------------------------------------------------ checking
def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def _original_indices(indices: torch.Tensor, kept: list[int] | None) -> torch.Tensor:
    if kept is None:
        return indices
    return torch.tensor(kept, device=indices.device)[indices]


def kept_experts_per_router(config: ModSquadConfig) -> list[list[int] | None]:
    """Per router ([`router_layout`] order), the original experts a pruned model kept; None for unpruned routers."""
    mlp = iter(config.pruned_experts or [None] * len(config.moe_layer_indices))
    attention = iter(config.pruned_attention_experts or [None] * len(config.attention_moe_layer_indices))
    return [next(attention) if s.kind == "attention" else next(mlp) for s in router_layout(config)]


@torch.inference_mode()
def compare_pruned_outputs(
    full: torch.nn.Module, pruned: ModSquadForTask, data: Iterable, max_batches: int | None = None
) -> dict[str, float]:
    """Runs the full and the pruned model on the same batches and measures how far the pruned one is.

    Args:
        full: the model that was pruned ([`ModSquadForMultiTask`] or `ModSquadFor<Type>`).
        pruned: the output of [`prune_for_task`].
        data (`Iterable`): batches as [`collect_expert_usage`] takes them (the calibration data gives the exactness
            guarantee).
        max_batches (`int`, *optional*): stop after this many batches.

    Returns:
        `dict` with `max_abs_diff` (largest absolute difference over every prediction tensor of the outputs:
        logits, boxes, depth, hidden states; routing fields excluded) and `routing_agreement` (fraction of token
        slots whose expert, mapped back to the original experts, is the same in both models).
    """
    task = pruned.task
    full_kept, pruned_kept = kept_experts_per_router(full.config), kept_experts_per_router(pruned.config)
    parameter = next(full.parameters())
    max_diff, agreeing, slots, batches = 0.0, 0, 0, 0
    modes = full.training, pruned.training
    full.eval()
    pruned.eval()
    try:
        for pixels in pixel_batches(data, pruned.config, task):
            pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
            expected = full(pixel_values=pixels, task=task, output_router_logits=True, return_dict=True)
            got = pruned(pixel_values=pixels, output_router_logits=True, return_dict=True)
            for key, value in expected.items():
                if key in ROUTING_FIELDS:
                    continue
                for a, b in zip(_tensors(value), _tensors(got[key]), strict=True):
                    max_diff = max(max_diff, (a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
            routers = zip(expected.expert_indices, got.expert_indices, full_kept, pruned_kept)
            for a, b, a_kept, b_kept in routers:
                same = (
                    _original_indices(a, a_kept).sort(-1).values
                    == _original_indices(b, b_kept).sort(-1).values
                )
                agreeing += int(same.sum())
                slots += same.numel()
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        full.train(modes[0])
        pruned.train(modes[1])
    if batches == 0:
        raise ValueError(f"the data yielded no batches of task {task!r}; nothing to compare")
    return {"max_abs_diff": max_diff, "routing_agreement": agreeing / slots if slots else 1.0}


__all__ = [
    "DEFAULT_PRUNE_THRESHOLD",
    "compare_pruned_outputs",
    "kept_experts_per_router",
    "prune_for_task",
    "select_experts",
]
