"""Multi-scale dense features from a plain ViT: a ViTDet-style simple feature pyramid over `config.feature_layers`.

A ViT has one resolution (the patch grid, stride `patch_size`). Dense heads need several, so each pyramid level
takes the patch tokens of one chosen block, lays them out on the grid and resamples them: x4 and x2 learned
upsampling, identity, and /2 max-pooling, i.e. strides `patch_size / 4, / 2, / 1, * 2` (4/8/16/32 for 16-pixel
patches, 2/4/8/16 for 8-pixel ones). Upsampling levels that would be finer than one pixel are left out, so very
small patches give fewer levels.

Only `nn.Conv2d` and `nn.LayerNorm` carry weights here: they are what `ModSquadPreTrainedModel._init_weights`
initialises, so a head loaded from a checkpoint without it (e.g. a classification one) starts from sane weights.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .configuration_modsquad import ModSquadConfig, task_option
from .modeling_modsquad import NUM_PREFIX_TOKENS, ModSquadModelOutput

# Resampling factors relative to the patch grid, finest first (ViTDet: 4x, 2x, 1x, 1/2x).
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)
# Input-sized activations of a dense head (upsampled logits, full-resolution layers) larger than this for the
# batch are recomputed in the backward one image at a time instead of kept: at 224 px they outgrow the backbone's
# (about 1 GB for 8 ADE20K images' logits), while at the demo's 64 px, keeping them is cheaper than recomputing.
CHECKPOINT_ACTIVATION_BYTES = 64 * 2**20


def pyramid_scales(patch_size: int) -> tuple[float, ...]:
    """Resampling factors of the pyramid levels for `patch_size`, finest first; a level is kept only if its stride
    (`patch_size / scale`) is at least one pixel."""
    return tuple(scale for scale in PYRAMID_SCALES if patch_size / scale >= 1)


def tokens_to_grid(
    hidden_state: torch.Tensor, grid_size: tuple[int, int], num_prefix_tokens: int = NUM_PREFIX_TOKENS
) -> torch.Tensor:
    """Drops the `[CLS]` and task tokens and lays the patch tokens out on the patch grid.

    Args:
        hidden_state (`torch.Tensor` of shape `(batch_size, num_prefix_tokens + grid_height * grid_width,
            hidden_size)`): one block's output.
        grid_size (`tuple[int, int]`): `(grid_height, grid_width)` of the input's patch grid.
        num_prefix_tokens (`int`, *optional*, defaults to 2): tokens before the patches (`config.num_prefix_tokens`).

    Returns:
        `torch.Tensor` of shape `(batch_size, hidden_size, grid_height, grid_width)`.
    """
    batch, length, channels = hidden_state.shape
    grid_height, grid_width = grid_size
    if length != num_prefix_tokens + grid_height * grid_width:
        raise ValueError(
            f"hidden state has {length} tokens; a {grid_height}x{grid_width} patch grid needs "
            f"{num_prefix_tokens + grid_height * grid_width} ({num_prefix_tokens} prefix tokens + patches)"
        )
    patches = hidden_state[:, num_prefix_tokens:]
    return patches.transpose(1, 2).reshape(batch, channels, grid_height, grid_width)


def feature_hidden_state_indices(config: ModSquadConfig, layers) -> list[int]:
    """The entries of the backbone's `hidden_states` a dense head reads for the blocks `layers`: every block but the
    last, whose tokens it takes final-normed from `last_hidden_state` (see [`block_tokens`])."""
    return sorted({layer + 1 for layer in layers if layer != config.num_hidden_layers - 1})


def block_tokens(backbone_output: ModSquadModelOutput, layer: int, num_hidden_layers: int) -> torch.Tensor:
    """The output tokens of block `layer`, `(batch_size, num_prefix_tokens + num_patches, hidden_size)`: those of
    the last block through the backbone's final LayerNorm (`last_hidden_state`, the same normalisation every head
    sees), the others as the block left them (`hidden_states[layer + 1]`, which the head normalises itself)."""
    if layer == num_hidden_layers - 1:
        return backbone_output.last_hidden_state
    if backbone_output.hidden_states is None or backbone_output.hidden_states[layer + 1] is None:
        raise ValueError(
            f"dense heads need the backbone's hidden state of block {layer}: run it with output_hidden_states=True"
        )
    return backbone_output.hidden_states[layer + 1]


def feature_norm(config: ModSquadConfig, layer: int) -> nn.Module:
    """The LayerNorm a dense head applies to the tokens of block `layer`: none for the last block, whose tokens come
    through the backbone's final LayerNorm (see [`block_tokens`]), a LayerNorm of its own for the others."""
    if layer == config.num_hidden_layers - 1:
        return nn.Identity()
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def superseded_norm_patterns(model: nn.Module) -> set[str]:
    """Weight-name patterns of the LayerNorms that dense heads of older checkpoints applied to the last block's tokens,
    now read through the backbone's final LayerNorm (the `nn.Identity` entries of their `norms`): weights that such
    checkpoints hold and today's models rightly leave unused."""
    patterns = set()
    for name, module in model.named_modules():
        if name.endswith(".norms") and isinstance(module, nn.ModuleList):
            for index, norm in enumerate(module):
                if isinstance(norm, nn.Identity):
                    patterns.add(rf"^{re.escape(name)}\.{index}\.")
    return patterns


class ModSquadChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a `(batch, channels, height, width)` map (ViTDet's `LayerNorm2d`).

    A subclass of `nn.LayerNorm` so that the model's `_init_weights` covers it."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ModSquadUpsample2x(nn.Sequential):
    """Learned x2 upsampling: a 1x1 convolution to four times the channels, then pixel shuffle. This is exactly a
    2x2 stride-2 transposed convolution, written with a plain `Conv2d` (see the module docstring)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.Conv2d(in_channels, 4 * out_channels, kernel_size=1), nn.PixelShuffle(2))


def build_resampler(scale: float, channels: int) -> tuple[nn.Module, int]:
    """The resampling of one pyramid level and the channels it outputs (ViTDet: upsampling halves the width)."""
    if scale == 4.0:
        half, quarter = max(channels // 2, 1), max(channels // 4, 1)
        resampler = nn.Sequential(
            ModSquadUpsample2x(channels, half),
            ModSquadChannelLayerNorm(half),
            nn.GELU(),
            ModSquadUpsample2x(half, quarter),
        )
        return resampler, quarter
    if scale == 2.0:
        half = max(channels // 2, 1)
        return ModSquadUpsample2x(channels, half), half
    if scale == 1.0:
        return nn.Identity(), channels
    if scale == 0.5:
        # ceil_mode keeps a 1-patch-wide grid at one cell instead of pooling it away.
        return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True), channels
    raise ValueError(f"pyramid scale {scale} is not supported; accepted: {list(PYRAMID_SCALES)}")


class ModSquadFeaturePyramid(nn.Module):
    r"""
    ViTDet-style simple feature pyramid over the blocks listed in `config.feature_layers`.

    Level `i` (finest first) reads block `feature_layers[j]` with `j` spread evenly over the listed blocks
    (shallow blocks feed fine levels, the last listed block feeds the coarsest level; with one listed block every
    level reads it, as in ViTDet). Each level LayerNorms the block's patch tokens (block outputs are un-normalised
    residual streams; the last block's come through the backbone's final LayerNorm, so that a model trained on dense
    tasks alone trains it too), lays them out on the patch grid, resamples them (see [`pyramid_scales`]) and projects them
    to `out_channels` with a 1x1 then a 3x3 convolution, each followed by a channel LayerNorm.

    Args:
        config ([`ModSquadConfig`]): model configuration (`hidden_size`, `patch_size`, `feature_layers`).
        out_channels (`int`): channels of every pyramid level.
    """

    def __init__(self, config: ModSquadConfig, out_channels: int):
        super().__init__()
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        self.patch_size = config.patch_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.scales = pyramid_scales(config.patch_size)
        self.strides = tuple(config.patch_size / scale for scale in self.scales)
        self.out_channels = out_channels
        layers = list(config.feature_layers)
        num_levels = len(self.scales)
        spread = [round(i * (len(layers) - 1) / max(num_levels - 1, 1)) for i in range(num_levels)]
        self.level_layers = tuple(layers[j] for j in spread)

        self.num_hidden_layers = config.num_hidden_layers
        self.norms = nn.ModuleList(feature_norm(config, layer) for layer in self.level_layers)
        self.resamplers = nn.ModuleList()
        self.projections = nn.ModuleList()
        for scale in self.scales:
            resampler, channels = build_resampler(scale, config.hidden_size)
            self.resamplers.append(resampler)
            self.projections.append(
                nn.Sequential(
                    nn.Conv2d(channels, out_channels, kernel_size=1, bias=False),
                    ModSquadChannelLayerNorm(out_channels),
                    nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                    ModSquadChannelLayerNorm(out_channels),
                )
            )

    def forward(
        self, backbone_output: ModSquadModelOutput, image_size: tuple[int, int]
    ) -> list[torch.Tensor]:
        r"""
        Args:
            backbone_output ([`ModSquadModelOutput`]): the backbone's output, with the `hidden_states` of the listed
                blocks but the last (see [`block_tokens`]).
            image_size (`tuple[int, int]`): `(height, width)` of the input images, which fixes the patch grid.

        Returns:
            `list[torch.Tensor]`: one map per level, finest first; level `k` has shape
            `(batch_size, out_channels, grid_height * scales[k], grid_width * scales[k])` (pooling rounds up),
            where `grid = image_size // patch_size`.
        """
        grid_size = (image_size[0] // self.patch_size, image_size[1] // self.patch_size)
        levels = []
        for layer, norm, resampler, projection in zip(
            self.level_layers, self.norms, self.resamplers, self.projections
        ):
            tokens = block_tokens(backbone_output, layer, self.num_hidden_layers)
            grid = tokens_to_grid(norm(tokens), grid_size, self.num_prefix_tokens)
            levels.append(projection(resampler(grid)))
        return levels


def checkpoint_per_image(features: torch.Tensor, activation_bytes: int) -> bool:
    """Whether a dense head should run its input-sized layers one image at a time under activation checkpointing:
    while training (`features` needs a gradient), for a batch of several images, when those layers' activations
    (`activation_bytes` for the whole batch) exceed `CHECKPOINT_ACTIVATION_BYTES`."""
    return (
        torch.is_grad_enabled()
        and features.requires_grad
        and features.shape[0] > 1
        and activation_bytes > CHECKPOINT_ACTIVATION_BYTES
    )


def dense_head_channels(task: dict) -> int:
    """Width of a dense head's pyramid and decoder: the task entry's `decoder_channels` (default 256)."""
    return task_option(task, "decoder_channels")


__all__ = [
    "CHECKPOINT_ACTIVATION_BYTES",
    "PYRAMID_SCALES",
    "ModSquadChannelLayerNorm",
    "ModSquadFeaturePyramid",
    "ModSquadUpsample2x",
    "block_tokens",
    "checkpoint_per_image",
    "dense_head_channels",
    "feature_hidden_state_indices",
    "feature_norm",
    "pyramid_scales",
    "superseded_norm_patterns",
    "tokens_to_grid",
]
