"""Sparse upcycling: a ModSquad model initialised from a dense ViT, DeiT or DINOv2 checkpoint.

Attention, norms, patch and position embeddings are copied; the MLP experts of every MoE block are built from the
dense block's MLP `y = W2 act(W1 x + b1) + b2` (hidden width `I`) in one of two modes:

- `"copy"` (Komatsuzaki et al., "Sparse Upcycling"): every expert is a full copy of the MLP
  (`expert_intermediate_size = I`). With `norm_topk_prob=True` the top-k mixing weights sum to one, so a block of
  identical experts computes exactly its dense MLP whatever the router picks. A token's top-k experts cost `k`
  dense MLPs.
- `"partition"` (compute-matched, as MoEfication / Mod-Squad's experts of width `mlp / k`): the `I` hidden units are
  cut into `k = num_experts_per_tok` contiguous slices of `I / k` units (`expert_intermediate_size = I / k`), so `k`
  active experts cost one dense MLP. Expert `e` holds slice `e % k`, with its down projection scaled by `k` and the
  whole second bias `b2`: `f_e(x) = k W2[:, s] act(W1[s] x + b1[s]) + b2`. The experts form `E / k` groups of `k`
  consecutive experts, each group holding every slice once. What is exact:
    * the `k` slices with weight 1 each (and `b2` counted once) sum to the dense MLP, since the MLP is a sum over its
      hidden units;
    * so a token whose top-k experts are one whole group, with equal mixing weights `1 / k`, gets exactly the dense
      output: `sum_j (1/k) f_{e_j}(x) = sum_s W2[:, s] act(W1[s] x + b1[s]) + b2`;
    * the routers are initialised so that this holds for every token at initialisation: the router rows of the `k`
      experts of a group are equal (one random row per group and task), so their logits tie, the group with the
      largest logit wins all `k` top-k slots and the renormalised weights are equal. Different tokens pick different
      groups, so the groups receive different tokens and drift apart when trained.
  What is approximate: a top-k that mixes groups (router noise while training, routers trained away from the
  grouped init, or independently random router rows) computes `k * sum_j w_j g_{s_j}(x) + b2` with slices missing
  or repeated: an unbiased but noisy estimate of the dense MLP when the choices are uniform (the tests measure it).
  Routers initialised to zero tie every logit, and top-k tie-breaking does not pick a group: partition mode needs
  `router_init_std > 0`.

Attention experts (`moe_attention=True`) are copies of the dense attention in both modes (an attention expert
shares one key/value projection with its siblings, so it cannot hold a slice of the dense heads' keys and values);
they are compute-matched only with `attention_experts_per_tok=1`.

The sequence of a ModSquad model has one token more than a ViT's: the task token after `[CLS]`. DeiT already has a
token in that slot (its distillation token), which every task token copies, so an upcycled DeiT equals the dense
DeiT outright. For ViT and DINOv2 the task token starts as a copy of the `[CLS]` token; the upcycled model then
equals the dense blocks applied to that longer sequence (what the tests check), which is the closest a model with a
task token can be to the dense one. With `task_conditioning="embedding"` there is no task token: the task embeddings
start at zero and an upcycled ViT or DINOv2 equals the dense model exactly (a DeiT drops its distillation token).

Called from `ModSquadPreTrainedModel.from_dense`; imports only torch, transformers and the model package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from ..model.configuration_modsquad import ModSquadConfig
from ..model.moe import ModSquadAttentionExperts, ModSquadSparseMLP

SUPPORTED_DENSE_TYPES = ("vit", "deit", "dinov2")
UPCYCLING_MODES = ("copy", "partition")

# Fields taken from the dense checkpoint: other values would break the weight copy.
_COPIED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "intermediate_size",
    "expert_intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "hidden_act",
    "layer_norm_eps",
)


@dataclass
class DenseBlock:
    """The parts of one dense pre-norm transformer block that an upcycled block is initialised from.

    `attention` has `q_proj`, `k_proj`, `v_proj`, `o_proj` linear layers; `attention_scale` and `mlp_scale` are
    DINOv2's per-channel layer scales (`None` for ViT and DeiT), folded into `o_proj` and `fc2` when copied.
    """

    norm1: nn.LayerNorm
    attention: nn.Module
    norm2: nn.LayerNorm
    fc1: nn.Linear
    fc2: nn.Linear
    attention_scale: torch.Tensor | None = None
    mlp_scale: torch.Tensor | None = None


def check_dense_config(config: PretrainedConfig, source: str | None = None) -> None:
    """Raises a ValueError when a dense checkpoint's config cannot be upcycled (model type, SwiGLU MLP)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_DENSE_TYPES:
        origin = f" ({source})" if source else ""
        raise ValueError(
            f"cannot upcycle a {model_type!r} model{origin}; accepted dense model types: {list(SUPPORTED_DENSE_TYPES)}"
        )
    if getattr(config, "use_swiglu_ffn", False):
        raise ValueError(
            "cannot upcycle a DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True): experts are GELU MLPs"
        )


def check_upcycling_mode(mode: str) -> None:
    if mode not in UPCYCLING_MODES:
        raise ValueError(f"upcycling mode {mode!r}; accepted: {list(UPCYCLING_MODES)}")


def load_dense_backbone(model_or_path: PreTrainedModel | str | os.PathLike, **from_pretrained_kwargs):
    """The dense backbone (`ViTModel`, `DeiTModel` or `Dinov2Model`) of a model instance, a local folder or a Hub id.

    Head models (`ViTForImageClassification`, ...) are accepted: their backbone is used and their head left out.
    """
    if isinstance(model_or_path, (str, os.PathLike)):
        model = AutoModel.from_pretrained(model_or_path, **from_pretrained_kwargs)
    elif isinstance(model_or_path, PreTrainedModel):
        if from_pretrained_kwargs:
            raise ValueError(
                f"dense_kwargs={sorted(from_pretrained_kwargs)} apply only when loading from a path or Hub id"
            )
        model = model_or_path
    else:
        raise ValueError(
            "model_or_path must be a transformers PreTrainedModel, a local folder or a Hub id, "
            f"got {type(model_or_path).__name__}"
        )
    check_dense_config(model.config)
    return model.base_model


def dense_blocks(backbone: PreTrainedModel) -> list[DenseBlock]:
    """The transformer blocks of a dense ViT / DeiT / DINOv2 backbone, in order."""
    if backbone.config.model_type == "dinov2":
        return [
            DenseBlock(
                layer.norm1,
                layer.attention,
                layer.norm2,
                layer.mlp.fc1,
                layer.mlp.fc2,
                attention_scale=layer.layer_scale1.lambda1,
                mlp_scale=layer.layer_scale2.lambda1,
            )
            for layer in backbone.encoder.layer
        ]
    return [
        DenseBlock(
            layer.layernorm_before, layer.attention, layer.layernorm_after, layer.mlp.fc1, layer.mlp.fc2
        )
        for layer in backbone.layers
    ]


def dense_intermediate_size(config: PretrainedConfig) -> int:
    """Hidden width of the MLP of a dense ViT / DeiT (`intermediate_size`) or DINOv2 (`hidden_size * mlp_ratio`)."""
    if config.model_type == "dinov2":
        return int(config.hidden_size * config.mlp_ratio)
    return config.intermediate_size


def upcycled_fields(
    config: PretrainedConfig, mode: str = "copy", num_experts_per_tok: int | None = None
) -> dict[str, Any]:
    """The [`ModSquadConfig`] fields an upcycled model takes from a dense checkpoint's config (no weights needed).

    Args:
        config: the dense ViT / DeiT / DINOv2 config.
        mode (`str`, *optional*, defaults to `"copy"`): upcycling mode, one of `UPCYCLING_MODES`; sets
            `expert_intermediate_size` (the dense MLP width, or that width / `num_experts_per_tok`).
        num_experts_per_tok (`int`, *optional*): top-k; defaults to [`ModSquadConfig`]'s.

    Returns:
        `dict` of the `_COPIED_FIELDS`.
    """
    check_dense_config(config)
    check_upcycling_mode(mode)
    intermediate = dense_intermediate_size(config)
    top_k = num_experts_per_tok if num_experts_per_tok is not None else ModSquadConfig.num_experts_per_tok
    expert_width = intermediate
    if mode == "partition":
        if not isinstance(top_k, int) or top_k < 1 or intermediate % top_k:
            raise ValueError(
                f"upcycling mode 'partition' cuts the dense MLP's {intermediate} hidden units into "
                f"num_experts_per_tok={top_k!r} equal slices; accepted num_experts_per_tok: "
                f"{[k for k in range(1, 17) if intermediate % k == 0]} (or mode 'copy')"
            )
        expert_width = intermediate // top_k
    return {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "intermediate_size": intermediate,
        "expert_intermediate_size": expert_width,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "num_channels": config.num_channels,
        "qkv_bias": config.qkv_bias,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
    }


def conflicting_fields(requested: dict[str, Any], copied: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The copied fields that `requested` sets to another value than the dense checkpoint: name -> (asked, dense)."""
    return {
        key: (requested[key], copied[key])
        for key in sorted(set(requested) & set(copied))
        if not _same(requested[key], copied[key])
    }


def _same(a: Any, b: Any) -> bool:
    # image_size may be 224 or [224, 224]: both mean the same grid.
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return _as_pair(a) == _as_pair(b)
    return a == b


def _as_pair(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value, value]


def modsquad_config_from_dense(
    backbone_or_config: PreTrainedModel | PretrainedConfig, mode: str = "copy", **config_kwargs
) -> ModSquadConfig:
    """A [`ModSquadConfig`] with the dense backbone's shape and the experts of upcycling mode `mode`.

    Args:
        backbone_or_config: a dense backbone from [`load_dense_backbone`], or its config.
        mode (`str`, *optional*, defaults to `"copy"`): `"copy"` (experts as wide as the dense MLP) or
            `"partition"` (experts of width `dense MLP / num_experts_per_tok`); see the module docstring.
        config_kwargs: any other [`ModSquadConfig`] field (`tasks`, `num_experts`, `num_experts_per_tok`,
            `moe_layers`, `moe_attention`, ...). Fields taken from the checkpoint (`_COPIED_FIELDS`) may be given only
            with the checkpoint's value. `norm_topk_prob` defaults to `True`, which makes the upcycled model equal the
            dense one at initialisation; with `moe_attention`, `attention_expert_heads` defaults to the dense head
            count, the only width at which an attention expert can copy the dense attention.
    """
    dense = getattr(backbone_or_config, "config", backbone_or_config)
    copied = upcycled_fields(dense, mode, config_kwargs.get("num_experts_per_tok"))
    clashes = conflicting_fields(config_kwargs, copied)
    if clashes:
        details = ", ".join(
            f"{key}={asked!r} but the checkpoint has {value!r}" for key, (asked, value) in clashes.items()
        )
        raise ValueError(
            f"from_dense takes {sorted(clashes)} from the dense checkpoint: {details} (leave them out or give the "
            f"checkpoint's values); fields it copies: {list(_COPIED_FIELDS)}"
        )
    kwargs = {
        **copied,
        "initializer_range": dense.initializer_range,
        "hidden_dropout_prob": dense.hidden_dropout_prob,
        "attention_probs_dropout_prob": dense.attention_probs_dropout_prob,
        "drop_path_rate": getattr(dense, "drop_path_rate", 0.0),
        "norm_topk_prob": True,
    }
    kwargs.update(config_kwargs)
    if kwargs.get("moe_attention"):
        heads = kwargs.setdefault("attention_expert_heads", dense.num_attention_heads)
        if heads != dense.num_attention_heads:
            raise ValueError(
                f"attention_expert_heads={heads}: upcycled attention experts copy the dense attention, so they need "
                f"all of its heads; accepted: {dense.num_attention_heads} (or leave it unset)"
            )
    config = ModSquadConfig(**kwargs)
    if mode == "partition":
        top_k = config.num_experts_per_tok
        uneven = [count for count in config.experts_per_layer if count % top_k]
        if uneven:
            raise ValueError(
                f"upcycling mode 'partition' builds groups of num_experts_per_tok={top_k} experts (one per slice of "
                f"the dense MLP), so num_experts must be a multiple of {top_k}; got num_experts={config.num_experts}"
            )
    return config


@torch.no_grad()
def copy_dense_weights(
    model: PreTrainedModel, backbone: PreTrainedModel, router_init_std: float, mode: str = "copy"
) -> None:
    """Fills the ModSquad backbone of `model` from a dense backbone of the same shape.

    Args:
        model: a ModSquad model built from [`modsquad_config_from_dense`] (any class; its `modsquad` backbone, or
            itself for a `ModSquadModel`, is filled).
        backbone: the dense backbone.
        router_init_std (`float`): std of the routers' normal initialisation. Identical experts give the task loss
            no gradient on the router, so a random router is what sends different tokens to different experts and
            lets them diverge; 0 keeps the zero-initialised routers (copy mode only).
        mode (`str`, *optional*, defaults to `"copy"`): how the MLP experts are built (see the module docstring).
    """
    check_upcycling_mode(mode)
    if mode == "partition" and router_init_std <= 0:
        raise ValueError(
            f"router_init_std={router_init_std}: upcycling mode 'partition' needs random routers (> 0), whose equal "
            "rows within a group make every token pick one whole group; zero routers tie every logit"
        )
    target = model.base_model
    dense_embeddings = backbone.embeddings
    embeddings = target.embeddings
    embeddings.patch_embeddings.projection.load_state_dict(
        dense_embeddings.patch_embeddings.projection.state_dict()
    )
    embeddings.cls_token.copy_(dense_embeddings.cls_token)
    positions = dense_embeddings.position_embeddings
    if backbone.config.model_type == "deit":
        # DeiT's second slot is its distillation token: the task tokens take it over, position embedding included.
        embeddings.position_embeddings.copy_(torch.cat((positions[:, :1], positions[:, 2:]), dim=1))
        task_token = dense_embeddings.distillation_token[0, 0] + positions[0, 1]
    else:
        embeddings.position_embeddings.copy_(positions)
        task_token = dense_embeddings.cls_token[0, 0] + positions[0, 0]
    if model.config.task_conditioning == "embedding":
        # Added to every token before every block: zero leaves the dense computation as it is (a ViT or DINOv2 is
        # then reproduced exactly, with no extra token; a DeiT loses its distillation token).
        task_token = torch.zeros_like(task_token)
    embeddings.task_tokens.copy_(task_token.expand_as(embeddings.task_tokens))

    for block, dense in zip(target.layers, dense_blocks(backbone), strict=True):
        block.norm1.load_state_dict(dense.norm1.state_dict())
        block.norm2.load_state_dict(dense.norm2.state_dict())
        _copy_attention(block.attention, dense, router_init_std)
        if mode == "partition" and isinstance(block.mlp, ModSquadSparseMLP):
            _partition_mlp(block.mlp, dense, router_init_std)
        else:
            _copy_mlp(block.mlp, dense, router_init_std)
    target.layernorm.load_state_dict(backbone.layernorm.state_dict())


def _scaled(linear: nn.Linear, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of an output projection with a per-channel layer scale folded in."""
    bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
    if scale is None:
        return linear.weight, bias
    return linear.weight * scale[:, None], bias * scale


def _init_router(router: nn.Module, std: float) -> None:
    if std > 0:
        nn.init.normal_(router.weight, mean=0.0, std=std)
    else:
        nn.init.zeros_(router.weight)


def _init_grouped_router(router: nn.Module, std: float, group_size: int) -> None:
    """One random row per task and group of `group_size` consecutive experts, shared by the group's experts: their
    logits tie, so a token's top-`group_size` is one whole group, with equal weights."""
    num_tasks, num_experts, hidden = router.weight.shape
    rows = torch.empty(num_tasks, num_experts // group_size, hidden, dtype=router.weight.dtype)
    nn.init.normal_(rows, mean=0.0, std=std)
    router.weight.copy_(rows.repeat_interleave(group_size, dim=1))


def _copy_attention(attention: nn.Module, dense: DenseBlock, router_init_std: float) -> None:
    source = dense.attention
    out_weight, out_bias = _scaled(source.o_proj, dense.attention_scale)
    if isinstance(attention, ModSquadAttentionExperts):
        attention.k_proj.load_state_dict(source.k_proj.state_dict())
        attention.v_proj.load_state_dict(source.v_proj.state_dict())
        q_bias = (
            source.q_proj.bias if source.q_proj.bias is not None else attention.q_proj_bias[0].new_zeros(())
        )
        attention.q_proj.copy_(source.q_proj.weight.expand_as(attention.q_proj))
        attention.q_proj_bias.copy_(q_bias.expand_as(attention.q_proj_bias))
        attention.o_proj.copy_(out_weight.expand_as(attention.o_proj))
        attention.o_proj_bias.copy_(out_bias.expand_as(attention.o_proj_bias))
        _init_router(attention.router, router_init_std)
        return
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attention, name).load_state_dict(getattr(source, name).state_dict())
    attention.o_proj.weight.copy_(out_weight)
    attention.o_proj.bias.copy_(out_bias)


def _copy_mlp(mlp: nn.Module, dense: DenseBlock, router_init_std: float) -> None:
    down_weight, down_bias = _scaled(dense.fc2, dense.mlp_scale)
    if isinstance(mlp, ModSquadSparseMLP):
        experts = mlp.experts
        experts.up_proj.copy_(dense.fc1.weight.expand_as(experts.up_proj))
        experts.up_proj_bias.copy_(dense.fc1.bias.expand_as(experts.up_proj_bias))
        experts.down_proj.copy_(down_weight.expand_as(experts.down_proj))
        experts.down_proj_bias.copy_(down_bias.expand_as(experts.down_proj_bias))
        _init_router(mlp.router, router_init_std)
        return
    mlp.fc1.load_state_dict(dense.fc1.state_dict())
    mlp.fc2.weight.copy_(down_weight)
    mlp.fc2.bias.copy_(down_bias)


def _partition_mlp(mlp: ModSquadSparseMLP, dense: DenseBlock, router_init_std: float) -> None:
    """Compute-matched experts: expert `e` holds hidden-unit slice `e % k` of the dense MLP, its down projection
    scaled by `k`, and the whole second bias (see the module docstring for what this reproduces)."""
    experts, top_k = mlp.experts, mlp.router.top_k
    width = experts.up_proj.shape[1]
    down_weight, down_bias = _scaled(dense.fc2, dense.mlp_scale)
    for expert in range(experts.num_experts):
        units = slice((expert % top_k) * width, (expert % top_k + 1) * width)
        experts.up_proj[expert].copy_(dense.fc1.weight[units])
        experts.up_proj_bias[expert].copy_(dense.fc1.bias[units])
        # x k: the renormalised top-k weights are 1/k each, and the k slices must add up with weight 1.
        experts.down_proj[expert].copy_(down_weight[:, units] * top_k)
        experts.down_proj_bias[expert].copy_(down_bias)
    _init_grouped_router(mlp.router, router_init_std, top_k)


def upcycle(
    model_class: type[PreTrainedModel],
    model_or_path: PreTrainedModel | str | os.PathLike,
    task: str | None = None,
    router_init_std: float | None = None,
    dense_kwargs: dict | None = None,
    mode: str = "copy",
    **config_kwargs,
) -> PreTrainedModel:
    """Builds a `model_class` ModSquad model from a dense ViT, DeiT or DINOv2; see `ModSquadPreTrainedModel.from_dense`.

    Args:
        mode (`str`, *optional*, defaults to `"copy"`): `"copy"` or `"partition"` (see the module docstring).

    Returns:
        The upcycled model, in the dense model's dtype, in eval mode (as `from_pretrained` returns models).
    """
    check_upcycling_mode(mode)
    backbone = load_dense_backbone(model_or_path, **(dense_kwargs or {}))
    config = modsquad_config_from_dense(backbone, mode, **config_kwargs)
    if router_init_std is None:
        router_init_std = config.initializer_range
    if router_init_std < 0:
        raise ValueError(f"router_init_std must be >= 0, got {router_init_std}")
    model = model_class(config) if task is None else model_class(config, task=task)
    copy_dense_weights(model, backbone, router_init_std, mode)
    return model.to(dtype=backbone.dtype).eval()


__all__ = [
    "SUPPORTED_DENSE_TYPES",
    "UPCYCLING_MODES",
    "DenseBlock",
    "check_dense_config",
    "conflicting_fields",
    "copy_dense_weights",
    "dense_blocks",
    "dense_intermediate_size",
    "load_dense_backbone",
    "modsquad_config_from_dense",
    "upcycle",
    "upcycled_fields",
]
