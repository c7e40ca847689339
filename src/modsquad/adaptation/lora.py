"""PEFT adapters for ModSquad models: the `LoraConfig` that reaches attention projections, experts and heads.

LoRA reaches an `nn.Linear` through `target_modules` and a raw 3-D expert tensor (`[num_experts, out, in]`)
through `target_parameters`, where PEFT gives every expert its own rank-`r` update. The names differ between a
backbone, a head model, a multi-task model and a pruned model (whose blocks have different expert counts), so
[`lora_config_for`] reads them off the model instead of asking users to spell them.

An adapter is tied to the expert count of the model it was trained on: one trained on a multi-task model does not
fit the pruned model of one of its tasks (train it on the pruned model, which is the cheap one anyway).
"""

from __future__ import annotations

import re

from peft import LoraConfig
from torch import nn

from ..model.modeling_heads import ModSquadForTask
from ..model.modeling_modsquad import ModSquadMLP, ModSquadPreTrainedModel, ModSquadSelfAttention
from ..model.moe import ModSquadAttentionExperts, ModSquadExperts

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def lora_targets(
    model: nn.Module,
    target_experts: bool = True,
    target_attention: bool = True,
    target_dense_mlp: bool = False,
) -> tuple[list[str], list[str]]:
    """Full names of the LoRA targets of a ModSquad model.

    Args:
        model (`nn.Module`): any ModSquad model (backbone, head, multi-task or pruned).
        target_experts (`bool`): the MLP experts' `up_proj` and `down_proj` tensors (never their biases).
        target_attention (`bool`): the attention projections: the four linear layers of a dense attention block;
            the shared `k_proj` / `v_proj` layers and the per-expert `q_proj` / `o_proj` tensors of an
            attention-experts block.
        target_dense_mlp (`bool`): the `fc1` / `fc2` layers of the blocks without experts.

    Returns:
        `(target_modules, target_parameters)`: names of `nn.Linear` modules and of 3-D expert parameters.
    """
    modules, parameters = [], []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if target_attention and isinstance(module, ModSquadSelfAttention):
            modules += [prefix + projection for projection in ATTENTION_PROJECTIONS]
        elif target_attention and isinstance(module, ModSquadAttentionExperts):
            modules += [f"{prefix}k_proj", f"{prefix}v_proj"]
            parameters += [f"{prefix}q_proj", f"{prefix}o_proj"]
        elif target_experts and isinstance(module, ModSquadExperts):
            parameters += [f"{prefix}up_proj", f"{prefix}down_proj"]
        elif target_dense_mlp and isinstance(module, ModSquadMLP):
            modules += [f"{prefix}fc1", f"{prefix}fc2"]
    return modules, parameters


def head_module_names(model: nn.Module, task: str | list[str] | None = None) -> list[str]:
    """Names of the task heads to train fully (`modules_to_save`): the head of a single-task model, the named
    task(s) of a multi-task model (all of its heads when `task` is `None`); none for a bare backbone."""
    heads = getattr(model, "heads", None)
    if heads is None:
        if task is not None:
            raise ValueError(f"task={task!r} was given but {type(model).__name__} has no task heads")
        return []
    if isinstance(model, ModSquadForTask) and task is None:
        task = model.task
    tasks = list(heads) if task is None else [task] if isinstance(task, str) else list(task)
    unknown = [t for t in tasks if t not in heads]
    if unknown:
        raise ValueError(f"no head for task(s) {unknown}; this model's heads are {list(heads)}")
    return [f"heads.{t}" for t in tasks]


def lora_config_for(
    model: ModSquadPreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    target_experts: bool = True,
    target_attention: bool = True,
    train_head: bool = True,
    expert_r: int | None = None,
    target_dense_mlp: bool = False,
    task: str | list[str] | None = None,
    **lora_kwargs,
) -> LoraConfig:
    """A PEFT `LoraConfig` for a ModSquad model, its targets discovered from the model.

    Args:
        model ([`ModSquadPreTrainedModel`]): the model the adapter is for (a pruned task model included).
        r (`int`, *optional*, defaults to 8): LoRA rank of the attention (and dense MLP) projections.
        alpha (`int`, *optional*, defaults to 16): LoRA alpha; updates are scaled by `alpha / rank`.
        target_experts (`bool`, *optional*, defaults to `True`): adapt the MLP experts (`up_proj`, `down_proj`).
        target_attention (`bool`, *optional*, defaults to `True`): adapt the attention projections (for attention
            experts: their `q_proj` / `o_proj` tensors and the shared `k_proj` / `v_proj`).
        train_head (`bool`, *optional*, defaults to `True`): train the task head(s) fully (`modules_to_save`).
        expert_r (`int`, *optional*): rank of every expert's own update, MLP and attention experts alike (PEFT
            adapts each expert of a 3-D tensor separately, so an expert tensor's update costs `num_experts` times a
            linear layer's); defaults to `r`. PEFT 0.21 then warns that these `rank_pattern` keys "did not match
            any targeted module": its check ignores parameter targets; the ranks are applied.
        target_dense_mlp (`bool`, *optional*, defaults to `False`): also adapt the MLPs of the blocks without
            experts.
        task (`str` or `list[str]`, *optional*): heads to train in a multi-task model; all when `None`.
        lora_kwargs: other `LoraConfig` arguments. `lora_dropout` must stay 0 when experts are targeted (PEFT
            cannot apply dropout to a parameter update).

    Returns:
        `LoraConfig`, for `peft.get_peft_model(model, config)`.

    Example:

    ```python
    >>> from peft import get_peft_model
    >>> from modsquad.peft_utils import lora_config_for
    >>> peft_model = get_peft_model(pruned_model, lora_config_for(pruned_model, r=8, alpha=16))
    >>> peft_model.print_trainable_parameters()
    ```"""
    for field, value in (("r", r), ("expert_r", r if expert_r is None else expert_r)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field} must be a positive int, got {value!r}")
    modules, parameters = lora_targets(model, target_experts, target_attention, target_dense_mlp)
    if not modules and not parameters:
        raise ValueError(
            f"nothing to adapt in {type(model).__name__} with target_experts={target_experts}, "
            f"target_attention={target_attention}, target_dense_mlp={target_dense_mlp}; enable at least one that "
            "the model has"
        )
    if parameters and lora_kwargs.get("lora_dropout", 0.0):
        raise ValueError(
            f"lora_dropout={lora_kwargs['lora_dropout']} cannot apply to expert tensors (target_parameters); "
            "accepted: 0.0, or target_experts=False and no attention experts"
        )
    rank_pattern = dict(lora_kwargs.pop("rank_pattern", {}) or {})
    if expert_r is not None and expert_r != r:
        # Full, escaped names: a short pattern such as "q_proj" would also catch the dense attention layers.
        rank_pattern.update({re.escape(name): expert_r for name in parameters})
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=lora_kwargs.pop("lora_dropout", 0.0),
        target_modules=modules or None,
        target_parameters=parameters or None,
        modules_to_save=(head_module_names(model, task) or None) if train_head else None,
        rank_pattern=rank_pattern,
        **lora_kwargs,
    )


__all__ = ["head_module_names", "lora_config_for", "lora_targets"]
