"""Continual learning: add a task to a trained model without changing anything it computes for its old tasks.

[`add_task`] gives the new task its own task token, router rows over the old and the new experts, `new_experts`
new experts in every MoE block and a head, and freezes every parameter that existed before. Routers and experts are
single 3-D tensors shared by all tasks, so freezing "the old slices" of them takes a mechanism: each grown tensor
becomes a parametrization (`torch.nn.utils.parametrize`) that concatenates the frozen original parameter with a
separate trainable parameter holding only the new rows. Frozen parameters get no gradient, and optimizers skip
parameters without one, so the old values stay bit-identical whatever the optimizer does, weight decay included.

The old tasks never route to the new experts: their task entries get `routable_experts` (the old expert counts), and
their routers compute softmax and top-k over those experts only, exactly as before the growth. The default experts
kernel on CPU, `sorted_mm`, runs one GEMM per expert over exactly its rows, so experts nobody chose change nothing:
growing the model and then training the new task both leave the old tasks' outputs bit-identical.

The grown model saves as a normal ModSquad checkpoint (state-dict hooks write each grown tensor under its usual name,
with `num_experts` increased) and loads with `from_pretrained` or the Auto classes like any other. [`merge_added_task`]
turns the grown tensors back into plain parameters in memory; `add_task` does it itself before growing again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from ..model.configuration_modsquad import ModSquadConfig
from ..model.modeling_heads import ModSquadForTask, build_task_head
from ..model.modeling_modsquad import ModSquadModel
from ..model.modeling_multitask import ModSquadForMultiTask
from ..model.moe import ModSquadAttentionExperts, ModSquadTaskRouter

EXPERT_TENSORS = ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")
ATTENTION_EXPERT_TENSORS = ("q_proj", "q_proj_bias", "o_proj", "o_proj_bias")
# Config fields `prune_for_task` sets to record the parent model.
PRUNING_RECORD = ("pruned_experts", "pruned_attention_experts", "pruned_from")
# Attribute of a grown module holding its state-dict hook handles (removed by merge_added_task).
_HOOKS = "_modsquad_growth_hooks"


class AppendedRows(nn.Module):
    """Parametrization `original -> cat(pad(original), rows)`: a frozen tensor grown by trainable rows along dim 0.

    Args:
        rows (`torch.Tensor`): the new rows (trainable), shaped like the grown tensor's rows.
        pad (`int`, *optional*, defaults to 0): zero columns added to the original along dim 1 first (a router's old
            task rows over the new experts; those tasks never route there, so the zeros are never used).
    """

    def __init__(self, rows: torch.Tensor, pad: int = 0):
        super().__init__()
        self.rows = nn.Parameter(rows)
        self.pad = pad

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if self.pad:
            original = F.pad(original, (0, 0) * (original.ndim - 2) + (0, self.pad))
        return torch.cat((original, self.rows), dim=0)

    def split(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of `forward`: the original tensor and the new rows of a full grown tensor."""
        old_rows = full.shape[0] - self.rows.shape[0]
        original = full[:old_rows]
        if self.pad:
            original = original[:, : full.shape[1] - self.pad]
        return original, full[old_rows:]


def _save_full_tensors(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # A grown tensor is saved under its plain name, so the checkpoint is an ordinary ModSquad one.
    for name in list(module.parametrizations):
        for key in [k for k in state_dict if k.startswith(f"{prefix}parametrizations.{name}.")]:
            del state_dict[key]
        state_dict[f"{prefix}{name}"] = getattr(module, name).detach()


def _load_full_tensors(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    # The inverse of _save_full_tensors, so that a grown model can resume from its own state dict.
    for name, chain in module.parametrizations.items():
        key = f"{prefix}{name}"
        if key in state_dict:
            original, rows = chain[0].split(state_dict.pop(key))
            state_dict[f"{prefix}parametrizations.{name}.original"] = original
            state_dict[f"{prefix}parametrizations.{name}.0.rows"] = rows


def _grow(module: nn.Module, name: str, rows: torch.Tensor, pad: int = 0) -> None:
    """Makes `module.<name>` the frozen original with `rows` appended (and `pad` zero columns along dim 1)."""
    original = getattr(module, name)
    parametrize.register_parametrization(
        module, name, AppendedRows(rows.to(original.device, original.dtype), pad), unsafe=True
    )
    if not hasattr(module, _HOOKS):
        setattr(
            module,
            _HOOKS,
            [
                module.register_state_dict_post_hook(_save_full_tensors),
                module.register_load_state_dict_pre_hook(_load_full_tensors),
            ],
        )


def _new_expert_rows(module: nn.Module, names: tuple[str, ...], count: int, std: float) -> dict:
    """Freshly initialised rows for `count` new experts (weights truncated normal, biases zero, as at init)."""
    rows = {}
    for name in names:
        shape = (count, *getattr(module, name).shape[1:])
        rows[name] = (
            torch.zeros(shape)
            if name.endswith("_bias")
            else nn.init.trunc_normal_(torch.empty(shape), std=std)
        )
    return rows


def _grow_router(router: ModSquadTaskRouter, new_experts: int, std: float) -> None:
    # Random rather than zero rows: with zero logits top-k breaks ties by index and never reaches the new experts.
    hidden = router.weight.shape[-1]
    total = router.num_experts + new_experts
    _grow(router, "weight", torch.randn(1, total, hidden) * std, pad=new_experts)
    router.num_experts = total
    router.task_expert_limits = [*router.task_expert_limits, total]


def _grow_experts(module: nn.Module, names: tuple[str, ...], new_experts: int, std: float) -> None:
    if new_experts == 0:
        return
    for name, rows in _new_expert_rows(module, names, new_experts, std).items():
        _grow(module, name, rows)
    module.num_experts += new_experts


def merge_added_task(model: nn.Module) -> nn.Module:
    """Turns every tensor grown by [`add_task`] back into one plain parameter (values unchanged, frozen).

    Not needed for saving (a grown model already saves as a normal checkpoint); useful before handing the model to
    code that walks its parameters by name in memory, or to train the whole model again.

    Returns:
        The same model.
    """
    for module in model.modules():
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations):
            parametrize.remove_parametrizations(module, name, leave_parametrized=True)
            getattr(module, name).requires_grad_(False)
        for handle in getattr(module, _HOOKS, []):
            handle.remove()
        if hasattr(module, _HOOKS):
            delattr(module, _HOOKS)
    return model


def _grown_task_entries(
    config: ModSquadConfig, task: dict, new_experts: int, new_attention_experts: int
) -> dict[str, Any]:
    """The config fields after growth, validated by building a config from them."""
    tasks = []
    for entry in config.tasks:
        entry = dict(entry)
        if new_experts:
            entry.setdefault("routable_experts", config.num_experts)
        if new_attention_experts:
            entry.setdefault("routable_attention_experts", config.attention_num_experts)
        tasks.append(entry)
    tasks.append(dict(task))

    def grow(counts, extra):
        return [c + extra for c in counts] if isinstance(counts, list) else counts + extra

    fields = {"tasks": tasks, "num_experts": grow(config.num_experts, new_experts)}
    if config.moe_attention:
        fields["attention_num_experts"] = grow(config.attention_num_experts, new_attention_experts)
    # A pruned task model that learns a task is a multi-task model again, and its new experts have no parent:
    # the record of where it was pruned from no longer describes it.
    fields.update({field: None for field in PRUNING_RECORD if getattr(config, field, None) is not None})
    candidate = type(config).from_dict({**config.to_dict(), **fields})
    return {field: getattr(candidate, field) for field in fields}


def add_task(
    model: ModSquadForMultiTask | ModSquadModel,
    task: dict,
    new_experts: int = 2,
    new_attention_experts: int | None = None,
) -> ModSquadForMultiTask | ModSquadModel:
    """Adds a task to a trained model, in place, for continual learning.

    The new task gets a task token, a router row over the old and new experts of every MoE block, `new_experts` new
    MLP experts per MoE block (and `new_attention_experts` attention experts with `moe_attention`) and, for a
    [`ModSquadForMultiTask`], a head. Every parameter that existed before is frozen (`requires_grad=False`); the new
    rows of the shared router, expert and task-token tensors are separate trainable parameters (see the module
    docstring), so an optimizer built over `model.parameters()`, with weight decay or not, leaves the old values
    bit-identical. The old tasks never route to the new experts, so training the new task leaves their outputs
    bit-identical too.

    Args:
        model ([`ModSquadForMultiTask`] or [`ModSquadModel`]): the trained model. A single-task checkpoint (for
            instance a pruned one) loads as a `ModSquadForMultiTask` with `ModSquadForMultiTask.from_pretrained`.
        task (`dict`): the new task's entry, as in `ModSquadConfig(tasks=[...])`.
        new_experts (`int`, *optional*, defaults to 2): MLP experts added to every MoE block (0: the new task only
            learns to route among the old, frozen experts).
        new_attention_experts (`int`, *optional*): attention experts added to every MoE block; defaults to
            `new_experts` when the model has attention experts, and must be 0 or unset otherwise.

    Returns:
        The same model, grown. Train it on the new task with an optimizer over
        `[p for p in model.parameters() if p.requires_grad]` (or all of them), then `save_pretrained` as usual.

    Example:

    ```python
    >>> model = ModSquadForMultiTask.from_pretrained("my-modsquad")
    >>> add_task(model, {"name": "pets", "type": "image-classification", "num_labels": 37}, new_experts=2)
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    ```"""
    if isinstance(model, ModSquadForTask) or not isinstance(model, (ModSquadForMultiTask, ModSquadModel)):
        raise ValueError(
            f"add_task needs a ModSquadForMultiTask or a ModSquadModel, got {type(model).__name__}; load a "
            "single-task checkpoint with ModSquadForMultiTask.from_pretrained(...) to add tasks to it"
        )
    if not isinstance(task, dict):
        raise ValueError(f"task must be a task dict such as {{'name': ..., 'type': ...}}, got {task!r}")
    config = model.config
    if new_attention_experts is None:
        new_attention_experts = new_experts if config.moe_attention else 0
    for field, value in (("new_experts", new_experts), ("new_attention_experts", new_attention_experts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{field} must be a non-negative int, got {value!r}")
    if new_attention_experts and not config.moe_attention:
        raise ValueError(
            f"new_attention_experts={new_attention_experts} but the model has no attention experts "
            "(moe_attention=False); accepted: 0 or None"
        )
    grown_fields = _grown_task_entries(config, task, new_experts, new_attention_experts)

    merge_added_task(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    std = config.initializer_range
    backbone = model.base_model
    _grow(
        backbone.embeddings, "task_tokens", nn.init.trunc_normal_(torch.empty(1, config.hidden_size), std=std)
    )
    for block in backbone.layers:
        if block.is_moe:
            _grow_router(block.mlp.router, new_experts, std)
            _grow_experts(block.mlp.experts, EXPERT_TENSORS, new_experts, std)
        if isinstance(block.attention, ModSquadAttentionExperts):
            _grow_router(block.attention.router, new_attention_experts, std)
            _grow_experts(block.attention, ATTENTION_EXPERT_TENSORS, new_attention_experts, std)
    for field, value in grown_fields.items():
        setattr(config, field, value)

    if isinstance(model, ModSquadForMultiTask):
        entry = config.tasks[-1]
        reference = backbone.embeddings.cls_token
        head = build_task_head(config, entry).to(device=reference.device, dtype=reference.dtype)
        for module in head.modules():
            model._init_weights(module)
        model.heads[entry["name"]] = head
    return model


__all__ = ["AppendedRows", "add_task", "merge_added_task"]
