"""The Mod-Squad backbone: a ViT told its task by a task token, with per-task routed mixture-of-experts blocks.

Shipped as remote code next to saved checkpoints, so it imports only torch, transformers and sibling modules.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.output_capturing import (
    OutputRecorder,
    capture_outputs,
    maybe_install_capturing_hooks,
    resolve_hidden_states_indices,
    selected_hidden_states,
)

from .configuration_modsquad import ModSquadConfig
from .moe import (
    ModSquadAttentionExperts,
    ModSquadExperts,
    ModSquadSparseMLP,
    ModSquadTaskRouter,
    RouterOutput,
    load_balancing_loss,
    router_z_loss,
)
from .sorted_mm import AUTO

# Tokens in front of the patches with the default `task_conditioning="token"`: [CLS] then the task token (in general:
# `config.num_prefix_tokens`).
NUM_PREFIX_TOKENS = 2


@dataclass
class ModSquadModelOutput(ModelOutput):
    r"""
    Output of [`ModSquadModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_prefix_tokens + num_patches, hidden_size)`):
            Final-normed tokens: `[CLS]`, the task token (`task_conditioning="token"`, the default), then the patches
            in row-major order.
        pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            The final-normed `[CLS]` token.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
            The embeddings then the output of every block (before the final LayerNorm), each
            `(batch_size, num_prefix_tokens + num_patches, hidden_size)`. `output_hidden_states=[i, ...]` keeps only
            those entries (the others are `None`). With `task_conditioning="embedding"` the task embedding a block
            adds to its input is in none of them.
        attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
            One tensor per block, the attention probabilities `(batch_size, num_heads, sequence_length,
            sequence_length)` (computed by eager attention for that call). For a block of attention experts `num_heads` is
            `attention_expert_heads * attention_experts_per_tok`: for each key/value head, the queries of the
            token's chosen experts in routing order.
        router_logits (`tuple(torch.FloatTensor)`, *optional*, returned with `output_router_logits=True`):
            One `(batch_size * sequence_length, num_experts)` tensor per router, in block order (the attention
            router of a block before its MLP router).
        router_probs (`tuple(torch.FloatTensor)`, *optional*, returned with `output_router_logits=True`):
            Softmax of `router_logits`; what [`RoutingStatistics.update`] accumulates for the mutual-information loss.
        expert_indices (`tuple(torch.LongTensor)`, *optional*, returned with `output_router_logits=True`):
            One `(batch_size * sequence_length, top_k)` tensor per router: the experts each token was sent to.
        balance_loss (`torch.FloatTensor`, *optional*, returned with `output_router_logits=True`): Switch
            load-balancing loss of this batch (1.0 when balanced).
        z_loss (`torch.FloatTensor`, *optional*, returned with `output_router_logits=True`): router z-loss of this
            batch.
        aux_loss (`torch.FloatTensor`, *optional*, returned with `output_router_logits=True`):
            `balance_loss_coef * balance_loss + z_loss_coef * z_loss`, the per-batch auxiliary loss the heads add to
            their task loss (as Mixtral's heads add theirs when asked for router logits). The mutual-information loss
            needs several tasks and is taken over a whole optimizer step with [`RoutingStatistics`].
        task_id (`int`): id of the task this batch was run for.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_probs: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None
    balance_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    task_id: int | None = None


# ----------------------------------------------------------------------------------------------- embeddings
class ModSquadPatchEmbeddings(nn.Module):
    """Non-overlapping `patch_size` patches projected to `hidden_size` by a strided convolution."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch_size, {self.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}"
            )
        height, width = pixel_values.shape[-2:]
        if height < self.patch_size or width < self.patch_size:
            raise ValueError(f"images of {height}x{width} are smaller than one {self.patch_size}px patch")
        return self.projection(pixel_values.to(self.projection.weight.dtype)).flatten(2).transpose(1, 2)


class ModSquadEmbeddings(nn.Module):
    """`[CLS] + pos`, the task's learned token (`task_conditioning="token"`), then `patches + pos`; position
    embeddings are interpolated (bicubic) for inputs of another size or aspect ratio than `config.image_size`. With
    `task_conditioning="embedding"` the task's vector is not a token: the backbone adds it to every token before
    every block ([`task_embedding`])."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.task_as_token = config.task_conditioning == "token"
        self.patch_size = config.patch_size
        self.grid_size = tuple(s // config.patch_size for s in config.image_size_hw)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.patch_embeddings = ModSquadPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.task_tokens = nn.Parameter(torch.zeros(config.num_tasks, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Position embeddings (with the `[CLS]` one first) for a `grid_height x grid_width` patch grid."""
        if (grid_height, grid_width) == self.grid_size:
            return self.position_embeddings
        cls_pos, patch_pos = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        dim = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, *self.grid_size, dim).permute(0, 3, 1, 2)
        patch_pos = nn.functional.interpolate(
            patch_pos.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
        ).to(cls_pos.dtype)
        return torch.cat((cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)

    def forward(self, pixel_values: torch.Tensor, task_id: int) -> torch.Tensor:
        batch = pixel_values.shape[0]
        grid = (pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size)
        patches = self.patch_embeddings(pixel_values)
        pos = self.interpolate_pos_encoding(*grid)
        cls = (self.cls_token + pos[:, :1]).expand(batch, -1, -1)
        if not self.task_as_token:
            return self.dropout(torch.cat((cls, patches + pos[:, 1:]), dim=1))
        task = self.task_tokens[task_id].view(1, 1, -1).expand(batch, -1, -1)
        return self.dropout(torch.cat((cls, task, patches + pos[:, 1:]), dim=1))

    def task_embedding(self, task_id: int) -> torch.Tensor:
        """The `(1, 1, hidden_size)` vector of `task_id`, broadcast over the tokens of a batch."""
        return self.task_tokens[task_id].view(1, 1, -1)


# ------------------------------------------------------------------------------------------------ attention
def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention on `(batch, heads, seq, head_dim)`; key/value heads are repeated for GQA groups."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(-2, -1)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class ModSquadSelfAttention(nn.Module):
    """Dense multi-head self-attention, dispatched through Transformers' attention interface (sdpa, eager, ...)."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.dropout = config.attention_probs_dropout_prob
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.o_proj = nn.Linear(inner, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, task_id: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output `(batch, seq, hidden)` and its probabilities `(batch, heads, seq, seq)`: computed by eager
        attention when `output_attentions`, else by the configured kernel (`None` from those that do not form them,
        such as sdpa)."""
        batch, seq, _ = hidden_states.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attention_fn = (
            eager_attention_forward
            if output_attentions
            else ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        )
        attn, weights = attention_fn(
            self,
            query,
            key,
            value,
            None,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(attn.reshape(batch, seq, -1)), weights


class ModSquadMLP(nn.Module):
    """Dense GELU MLP of the non-MoE blocks."""

    def __init__(self, config: ModSquadConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, task_id: int) -> tuple[torch.Tensor, None]:
        return self.fc2(self.act(self.fc1(hidden_states))), None


class ModSquadDropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep = 1.0 - self.drop_prob
        mask = hidden_states.new_empty(
            (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        ).bernoulli_(keep)
        return hidden_states * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


class ModSquadBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block. In MoE blocks the MLP (and, with `moe_attention`, the attention) is a mixture of
    experts routed by the task's router."""

    def __init__(
        self,
        config: ModSquadConfig,
        drop_path: float,
        num_experts: int | None,
        num_attention_experts: int | None,
        expert_limits: list[int] | None = None,
        attention_expert_limits: list[int] | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if num_attention_experts:
            self.attention = ModSquadAttentionExperts(
                config, num_attention_experts, eager_attention_forward, attention_expert_limits
            )
        else:
            self.attention = ModSquadSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = (
            ModSquadSparseMLP(config, num_experts, expert_limits) if num_experts else ModSquadMLP(config)
        )
        self.drop_path = ModSquadDropPath(drop_path)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, ModSquadSparseMLP)

    def forward(
        self,
        hidden_states: torch.Tensor,
        task_id: int,
        output_attentions: bool = False,
        task_embedding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Attention probabilities and routing decisions are recorded from the submodules' outputs by the backbone's
        # `_can_record_outputs` hooks, so the block passes on only the hidden states.
        if task_embedding is not None:
            # `task_conditioning="embedding"`: the task's vector is added to every token before every block. Added
            # here rather than by the backbone, so that the recorded `hidden_states` stay the blocks' own outputs.
            hidden_states = hidden_states + task_embedding
        attn, _ = self.attention(self.norm1(hidden_states), task_id, output_attentions)
        hidden_states = hidden_states + self.drop_path(self.dropout(attn))
        mlp, _ = self.mlp(self.norm2(hidden_states), task_id)
        return hidden_states + self.drop_path(self.dropout(mlp))


# ------------------------------------------------------------------------------------------ pretrained base
IMAGE_PROCESSOR_MODULE = "image_processing_modsquad"

# Weight names of older checkpoints -> today's (regex -> replacement), applied by `from_pretrained` through
# Transformers' checkpoint conversion mapping. The detection neck's channel LayerNorm used to wrap an `nn.LayerNorm`
# as `.norm`; it is now the package's one `ModSquadChannelLayerNorm`.
LEGACY_KEY_RENAMES = {r"neck\.upsample\.(\d+)\.1\.norm\.": r"neck.upsample.\1.1."}
register_checkpoint_conversion_mapping(
    ModSquadConfig.model_type,
    [WeightRenaming(source, target) for source, target in LEGACY_KEY_RENAMES.items()],
    overwrite=True,
)


class ModSquadPreTrainedModel(PreTrainedModel):
    """Weight initialisation, experts/attention dispatch and remote-code saving shared by every ModSquad model."""

    config_class = ModSquadConfig
    config: ModSquadConfig
    base_model_prefix = "modsquad"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ModSquadEmbeddings", "ModSquadBlock"]
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    # What `output_hidden_states`, `output_attentions` and `output_router_logits` return, recorded from the modules'
    # outputs as in Transformers' own MoE models. One router call yields its logits, probabilities and chosen experts;
    # `output_router_logits=True` returns all three (training and pruning read the last two).
    _can_record_outputs = {
        "hidden_states": ModSquadBlock,
        "attentions": [ModSquadSelfAttention, ModSquadAttentionExperts],
        "router_logits": OutputRecorder(ModSquadTaskRouter, index=0),
        "router_probs": OutputRecorder(ModSquadTaskRouter, index=1),
        "expert_indices": OutputRecorder(ModSquadTaskRouter, index=2),
    }

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # The experts live in moe.py; Transformers' check only searches the model class's own module text.
        return True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Default to `"auto"` (sorted_mm.py): per call, the sorted per-expert GEMMs on CPU (the fastest exact kernel
        # there) and one grouped GEMM on GPUs. The device is not known here (models are built on CPU or meta and
        # moved), so the choice is made where the tokens are.
        return super().get_correct_experts_implementation(requested_experts or AUTO)

    def _activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, *args, **kwargs):
        # Reentrant checkpointing runs each block's forward without autograd and re-attaches only what the block
        # returns: the router outputs recorded inside it would carry no gradient, so the aux and mutual-information
        # losses would silently stop training the routers.
        checkpoint_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if checkpoint_kwargs["use_reentrant"]:
            raise ValueError(
                "use_reentrant=True is not supported: reentrant checkpointing drops the router gradients; "
                "accepted: use_reentrant=False (the default)"
            )
        super()._activation_checkpointing_enable(checkpoint_kwargs, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ModSquadEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            init.trunc_normal_(module.task_tokens, mean=0.0, std=std)
        elif isinstance(module, ModSquadTaskRouter):
            # Random (by default): with equal logits every token of every task would go to the same top-k experts.
            if self.config.router_init_std > 0:
                init.trunc_normal_(module.weight, mean=0.0, std=self.config.router_init_std)
            else:
                init.zeros_(module.weight)
        elif isinstance(module, ModSquadExperts):
            init.trunc_normal_(module.up_proj, mean=0.0, std=std)
            init.trunc_normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, ModSquadAttentionExperts):
            init.trunc_normal_(module.q_proj, mean=0.0, std=std)
            init.trunc_normal_(module.o_proj, mean=0.0, std=std)
            init.zeros_(module.q_proj_bias)
            init.zeros_(module.o_proj_bias)

    @classmethod
    def from_dense(
        cls,
        model_or_path: PreTrainedModel | str | os.PathLike,
        task: str | None = None,
        router_init_std: float | None = None,
        dense_kwargs: dict | None = None,
        upcycling_mode: str = "copy",
        **config_kwargs,
    ) -> ModSquadPreTrainedModel:
        r"""
        Sparse upcycling: builds this class from a dense ViT, DeiT or DINOv2 (patch and position embeddings,
        attention, norms copied; the experts built from their block's MLP). With the default `norm_topk_prob=True`
        the upcycled backbone computes what the dense one does: DeiT exactly (task tokens take the distillation
        token's slot); ViT and DINOv2 with the task token, initialised as a copy of `[CLS]`, added to the sequence.
        DINOv2's layer scales are folded into the output projections; the ViT pooler and dense heads are left out
        (heads start fresh).

        Args:
            model_or_path (`PreTrainedModel`, `str` or `os.PathLike`): a dense model (backbone or head model), a
                local folder or a Hub id such as `"google/vit-base-patch16-224"` or `"facebook/dinov2-small"`.
            task (`str`, *optional*): for single-task head classes, the task to serve when the config has several.
            router_init_std (`float`, *optional*): std of the routers' random initialisation, defaults to
                `initializer_range`; identical experts need a random router to receive different tokens. 0 keeps
                zero routers.
            dense_kwargs (`dict`, *optional*): `from_pretrained` arguments for loading `model_or_path`.
            upcycling_mode (`str`, *optional*, defaults to `"copy"`): `"copy"`: every expert a copy of the dense MLP
                (`expert_intermediate_size` = the MLP width; top-k costs k dense MLPs per token). `"partition"`:
                compute-matched experts, each a slice of `1 / num_experts_per_tok` of the MLP's hidden units, so the
                k active experts cost one dense MLP; routers start grouped so that every token picks all slices
                once (exact at initialisation; see `modsquad.adaptation.upcycling`).
            config_kwargs: other [`ModSquadConfig`] fields: `tasks`, `num_experts`, `num_experts_per_tok`,
                `moe_layers`, `moe_attention`, ... (the shape fields come from the dense checkpoint).

        Example:

        ```python
        >>> model = ModSquadForMultiTask.from_dense(
        ...     "facebook/dinov2-small", tasks=tasks, num_experts=16, num_experts_per_tok=4, moe_layers="all"
        ... )
        ```"""
        # Upcycling is a training-time tool of the package (`modsquad.adaptation.upcycling`), not part of the model
        # code shipped next to checkpoints: imported by name on use, so remote code never needs it.
        try:
            upcycling = importlib.import_module("modsquad.adaptation.upcycling")
        except ImportError as error:
            raise ImportError(
                "from_dense (sparse upcycling) needs the modsquad package: pip install modsquad"
            ) from error
        return upcycling.upcycle(
            cls, model_or_path, task, router_init_std, dense_kwargs, mode=upcycling_mode, **config_kwargs
        )

    def _remote_code_classes(self) -> dict[str, type]:
        """Auto class -> model class, for the `auto_map` of a saved folder: the backbone, plus what subclasses add
        (their own Auto class). The folder ships the modules of exactly these classes."""
        return {"AutoModel": ModSquadModel}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained` (safetensors), plus the modeling code this class needs and an `auto_map`,
        so the folder also loads with `trust_remote_code=True` where the `modsquad` package is not installed."""
        classes = self._remote_code_classes()
        auto_map = {"AutoConfig": f"{_module_stem(ModSquadConfig)}.{ModSquadConfig.__name__}"}
        auto_map.update({auto: f"{_module_stem(cls)}.{cls.__name__}" for auto, cls in classes.items()})
        files = [
            sys.modules[cls.__module__].__file__ for cls in (ModSquadConfig, type(self), *classes.values())
        ]
        # The processor is named here, in the model's auto_map, rather than in preprocessor_config.json: from an
        # image-processor auto_map Transformers infers a (non-existent) remote video processor and prompts users.
        processor_file = os.path.join(os.path.dirname(__file__), f"{IMAGE_PROCESSOR_MODULE}.py")
        if os.path.exists(processor_file):
            auto_map["AutoImageProcessor"] = f"{IMAGE_PROCESSOR_MODULE}.ModSquadImageProcessor"
            files.append(processor_file)
        self.config.auto_map = auto_map
        kwargs.pop("safe_serialization", None)  # safetensors only
        # Keys are written as this code names them; `LEGACY_KEY_RENAMES` only maps older checkpoints on loading.
        kwargs.setdefault("save_original_format", False)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            for module_file in dict.fromkeys(files):
                _copy_module_tree(module_file, save_directory)


def _module_stem(cls: type) -> str:
    return cls.__module__.rsplit(".", 1)[-1]


def _copy_module_tree(module_file: str, folder: str | os.PathLike) -> None:
    """Copies a module and the sibling modules it imports relatively (flat, as remote code is loaded)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    for path in (module_file, *get_relative_import_files(module_file)):
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))


# ------------------------------------------------------------------------------------------------- backbone
class ModSquadModel(ModSquadPreTrainedModel):
    """The Mod-Squad backbone: patch + task-token embeddings, pre-norm blocks (every MoE block with one router per
    task), a final LayerNorm. One call runs one task: `model(pixel_values, task="seg")`.

    Args:
        config ([`ModSquadConfig`]): model configuration.
    """

    # Loading the backbone alone from a head checkpoint leaves the heads behind on purpose.
    _keys_to_ignore_on_load_unexpected = [r"^heads\."]

    def __init__(self, config: ModSquadConfig):
        super().__init__(config)
        self.embeddings = ModSquadEmbeddings(config)
        moe_positions = {layer: i for i, layer in enumerate(config.moe_layer_indices)}
        attention_positions = {layer: i for i, layer in enumerate(config.attention_moe_layer_indices)}
        attention_experts = config.attention_experts_per_layer
        expert_limits = config.routable_experts_per_layer
        attention_expert_limits = config.routable_attention_experts_per_layer
        # Plain Python (not torch.linspace(...).tolist()): the model must also build on the meta device.
        last = max(config.num_hidden_layers - 1, 1)
        drop_rates = [config.drop_path_rate * layer / last for layer in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList()
        for layer in range(config.num_hidden_layers):
            moe_pos, attention_pos = moe_positions.get(layer), attention_positions.get(layer)
            self.layers.append(
                ModSquadBlock(
                    config,
                    drop_path=drop_rates[layer],
                    num_experts=config.experts_per_layer[moe_pos] if moe_pos is not None else None,
                    num_attention_experts=attention_experts[attention_pos]
                    if attention_pos is not None
                    else None,
                    expert_limits=expert_limits[moe_pos] if moe_pos is not None else None,
                    attention_expert_limits=attention_expert_limits[attention_pos]
                    if attention_pos is not None
                    else None,
                )
            )
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()
        # Install the output-recording hooks now, not on the first forward that asks for routing: installing them
        # takes a lock, which torch.compile cannot trace (a graph break in the first compiled call).
        maybe_install_capturing_hooks(self)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | int = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ModSquadModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Images as prepared by [`ModSquadImageProcessor`]; any size (position embeddings are interpolated).
            task (`str` or `int`, *optional*, defaults to 0):
                The task of this batch: a task name or id. Every image of a batch belongs to that one task.
            output_router_logits (`bool`, *optional*): return the routing tensors (`router_logits`, `router_probs`,
                `expert_indices`) and the router losses; defaults to `config.output_router_logits` (False).
            output_hidden_states (`bool` or `list[int]`, *optional*): return the embeddings and every block's output
                (or only those listed); defaults to `config.output_hidden_states`.
            output_attentions (`bool`, *optional*): return every block's attention probabilities (computed by eager
                attention for this call whatever `attn_implementation` is: sdpa and the other kernels never form
                them). Defaults to `config.output_attentions`.
            return_dict (`bool`, *optional*): return a [`ModSquadModelOutput`] rather than a tuple.
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        task_id = self.config.task_index(task)
        # One flag for the three tensors each router call yields (`_can_record_outputs`).
        routing = bool(output_router_logits)
        # The other flags reach the recorder only when given, so that the config's defaults apply otherwise.
        flags = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        kwargs.update({name: value for name, value in flags.items() if value is not None})
        output = self._encode(
            pixel_values,
            task_id,
            output_router_logits=routing,
            output_router_probs=routing,
            output_expert_indices=routing,
            return_dict=True,
            **kwargs,
        )
        if routing and output.router_logits:
            routings = [
                RouterOutput(logits, probs, indices, None)
                for logits, probs, indices in zip(
                    output.router_logits, output.router_probs, output.expert_indices
                )
            ]
            output.balance_loss = load_balancing_loss(routings)
            output.z_loss = router_z_loss(routings)
            output.aux_loss = (
                self.config.balance_loss_coef * output.balance_loss + self.config.z_loss_coef * output.z_loss
            )
        return output if return_dict else output.to_tuple()

    @capture_outputs(tie_last_hidden_states=False)
    def _encode(self, pixel_values: torch.Tensor, task_id: int, **kwargs) -> ModSquadModelOutput:
        # `hidden_states` are the blocks' outputs before the final LayerNorm (as in ViT), hence no tying.
        output_attentions = bool(kwargs.get("output_attentions", self.config.output_attentions))
        hidden_states = self.embeddings(pixel_values, task_id)
        task_embedding = None
        if self.config.task_conditioning == "embedding":
            task_embedding = self.embeddings.task_embedding(task_id)
        for block in self.layers:
            hidden_states = block(hidden_states, task_id, output_attentions, task_embedding)
        sequence_output = self.layernorm(hidden_states)
        return ModSquadModelOutput(
            last_hidden_state=sequence_output, pooler_output=sequence_output[:, 0], task_id=task_id
        )


def hidden_states_request(
    backbone: ModSquadModel, requested: bool | int | list[int] | None, needed: list[int]
) -> bool | list[int]:
    """What a head asks its backbone for when the caller asked for `requested` hidden states (a flag, an index or a
    list of them) and the head itself reads the entries `needed`: everything, or the union of both selections."""
    if requested is True:
        return True
    selected = set()
    if requested is not None and requested is not False:
        selected = resolve_hidden_states_indices(backbone, selected_hidden_states(requested))
    selected |= set(needed)
    return sorted(selected) if selected else False


def keep_requested_hidden_states(
    backbone: ModSquadModel, hidden_states: tuple | None, requested: bool | int | list[int] | None
) -> tuple | None:
    """The backbone's `hidden_states` cut down to what the caller asked for (`None` when nothing)."""
    if hidden_states is None or requested is None or requested is False:
        return None
    if requested is True:
        return hidden_states
    kept = resolve_hidden_states_indices(backbone, selected_hidden_states(requested), len(hidden_states))
    return tuple(state if index in kept else None for index, state in enumerate(hidden_states))


__all__ = [
    "ModSquadModel",
    "ModSquadModelOutput",
    "ModSquadPreTrainedModel",
    "hidden_states_request",
    "keep_requested_hidden_states",
]
