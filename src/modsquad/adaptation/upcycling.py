"""Sparse upcycling: a ModSquad model initialised from a dense ViT, DeiT or DINOv2 checkpoint.

Every expert of an MoE block starts as a copy of the dense block's MLP (and, with `moe_attention`, every attention
expert as a copy of its attention). With `norm_topk_prob=True` the top-k mixing weights sum to one, so a block of
identical experts computes exactly its dense MLP whatever the router picks: at initialisation the upcycled model
reproduces the dense model, and training then lets the experts drift apart (Komatsuzaki et al., "Sparse Upcycling").

The sequence of a ModSquad model has one token more than a ViT's: the task token after `[CLS]`. DeiT already has a
token in that slot (its distillation token), which every task token copies, so an upcycled DeiT equals the dense
DeiT outright. For ViT and DINOv2 the task token starts as a copy of the `[CLS]` token; the upcycled model then
equals the dense blocks applied to that longer sequence (what the tests check), which is the closest a model with a
task token can be to the dense one. With `task_conditioning="embedding"` there is no task token: the task embeddings
start at zero and an upcycled ViT or DINOv2 equals the dense model exactly (a DeiT drops its distillation token).

Called from `ModSquadPreTrainedModel.from_dense`; imports only torch, transformers and sibling modules so that it can
sit next to the modeling code as remote code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel

from ..model.configuration_modsquad import ModSquadConfig
from ..model.moe import ModSquadAttentionExperts, ModSquadSparseMLP

SUPPORTED_DENSE_TYPES = ("vit", "deit", "dinov2")

# Fields taken from the dense checkpoint: overriding them would break the weight copy.
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
    model_type = model.config.model_type
    if model_type not in SUPPORTED_DENSE_TYPES:
        raise ValueError(
            f"cannot upcycle a {model_type!r} model; accepted dense model types: {list(SUPPORTED_DENSE_TYPES)}"
        )
    if getattr(model.config, "use_swiglu_ffn", False):
        raise ValueError(
            "cannot upcycle a DINOv2 with a SwiGLU MLP (use_swiglu_ffn=True): experts are GELU MLPs"
        )
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


def modsquad_config_from_dense(backbone: PreTrainedModel, **config_kwargs) -> ModSquadConfig:
    """A [`ModSquadConfig`] with the dense backbone's shape, every expert as wide as its MLP.

    Args:
        backbone: a dense backbone from [`load_dense_backbone`].
        config_kwargs: any other [`ModSquadConfig`] field (`tasks`, `num_experts`, `num_experts_per_tok`,
            `moe_layers`, `moe_attention`, ...). `norm_topk_prob` defaults to `True`, which makes the upcycled
            model equal the dense one at initialisation; with `moe_attention`, `attention_expert_heads` defaults to
            the dense head count, the only width at which an attention expert can copy the dense attention.
    """
    clashes = sorted(set(config_kwargs) & set(_COPIED_FIELDS))
    if clashes:
        raise ValueError(
            f"from_dense takes {clashes} from the dense checkpoint; fields it copies: {list(_COPIED_FIELDS)}"
        )
    dense = backbone.config
    intermediate = dense_blocks(backbone)[0].fc1.out_features
    kwargs = {
        "hidden_size": dense.hidden_size,
        "num_hidden_layers": dense.num_hidden_layers,
        "num_attention_heads": dense.num_attention_heads,
        "intermediate_size": intermediate,
        "expert_intermediate_size": intermediate,
        "image_size": dense.image_size,
        "patch_size": dense.patch_size,
        "num_channels": dense.num_channels,
        "qkv_bias": dense.qkv_bias,
        "hidden_act": dense.hidden_act,
        "layer_norm_eps": dense.layer_norm_eps,
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
    return ModSquadConfig(**kwargs)


@torch.no_grad()
def copy_dense_weights(model: PreTrainedModel, backbone: PreTrainedModel, router_init_std: float) -> None:
    """Fills the ModSquad backbone of `model` from a dense backbone of the same shape.

    Args:
        model: a ModSquad model built from [`modsquad_config_from_dense`] (any class; its `modsquad` backbone, or
            itself for a `ModSquadModel`, is filled).
        backbone: the dense backbone.
        router_init_std (`float`): std of the routers' normal initialisation. Identical experts give the task loss
            no gradient on the router, so a random router is what sends different tokens to different experts and
            lets them diverge; 0 keeps the zero-initialised routers.
    """
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


def upcycle(
    model_class: type[PreTrainedModel],
    model_or_path: PreTrainedModel | str | os.PathLike,
    task: str | None = None,
    router_init_std: float | None = None,
    dense_kwargs: dict | None = None,
    **config_kwargs,
) -> PreTrainedModel:
    """Builds a `model_class` ModSquad model from a dense ViT, DeiT or DINOv2; see `ModSquadPreTrainedModel.from_dense`.

    Returns:
        The upcycled model, in the dense model's dtype, in eval mode (as `from_pretrained` returns models).
    """
    backbone = load_dense_backbone(model_or_path, **(dense_kwargs or {}))
    config = modsquad_config_from_dense(backbone, **config_kwargs)
    if router_init_std is None:
        router_init_std = config.initializer_range
    if router_init_std < 0:
        raise ValueError(f"router_init_std must be >= 0, got {router_init_std}")
    model = model_class(config) if task is None else model_class(config, task=task)
    copy_dense_weights(model, backbone, router_init_std)
    return model.to(dtype=backbone.dtype).eval()


__all__ = [
    "SUPPORTED_DENSE_TYPES",
    "DenseBlock",
    "copy_dense_weights",
    "dense_blocks",
    "load_dense_backbone",
    "modsquad_config_from_dense",
    "upcycle",
]
