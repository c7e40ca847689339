"""The simple feature pyramid that dense heads read: levels, strides, shapes, which block feeds which level."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import ALL_TASKS, tiny_config
from modsquad import ModSquadModel
from modsquad.model.feature_pyramid import (
    ModSquadFeaturePyramid,
    ModSquadUpsample2x,
    dense_head_channels,
    pyramid_scales,
    tokens_to_grid,
)


def run_pyramid(config, pixel_values: torch.Tensor, channels: int = 8) -> tuple[ModSquadFeaturePyramid, list]:
    backbone = ModSquadModel(config).eval()
    pyramid = ModSquadFeaturePyramid(config, channels)
    with torch.no_grad():
        hidden_states = backbone(pixel_values, output_hidden_states=True).hidden_states
        return pyramid, pyramid(hidden_states, pixel_values.shape[-2:])


@pytest.mark.parametrize(
    ("patch_size", "scales"),
    [(16, (4.0, 2.0, 1.0, 0.5)), (8, (4.0, 2.0, 1.0, 0.5)), (2, (2.0, 1.0, 0.5)), (1, (1.0, 0.5))],
)
def test_scales_follow_the_patch_size(patch_size, scales):
    assert pyramid_scales(patch_size) == scales


def test_patch16_gives_strides_4_to_32_on_non_square_input():
    config = tiny_config(patch_size=16)
    pyramid, levels = run_pyramid(config, torch.randn(2, 3, 64, 32))
    assert pyramid.strides == (4.0, 8.0, 16.0, 32.0)
    assert [tuple(level.shape) for level in levels] == [
        (2, 8, 16, 8),
        (2, 8, 8, 4),
        (2, 8, 4, 2),
        (2, 8, 2, 1),
    ]


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        (32, 32, [(16, 16), (8, 8), (4, 4), (2, 2)]),
        (32, 48, [(16, 24), (8, 12), (4, 6), (2, 3)]),
        # odd grids: pooling rounds up instead of dropping the last row/column
        (24, 40, [(12, 20), (6, 10), (3, 5), (2, 3)]),
    ],
)
def test_level_shapes_with_8px_patches(height, width, expected):
    _, levels = run_pyramid(tiny_config(), torch.randn(1, 3, height, width))
    assert [tuple(level.shape[-2:]) for level in levels] == expected
    assert all(level.shape[:2] == (1, 8) for level in levels)


@pytest.mark.parametrize(
    ("feature_layers", "expected"),
    [
        ([0, 1, 2, 3], (0, 1, 2, 3)),
        ([3], (3, 3, 3, 3)),
        ([1, 3], (1, 1, 3, 3)),
        ([0, 1, 2, 3, 4], (0, 1, 3, 4)),
    ],
)
def test_feature_layers_spread_over_levels(feature_layers, expected):
    config = tiny_config(num_hidden_layers=5, feature_layers=feature_layers)
    pyramid = ModSquadFeaturePyramid(config, 8)
    assert pyramid.level_layers == expected


def test_each_level_reads_its_own_block():
    config = tiny_config(feature_layers=[0, 1, 2, 3])
    pyramid = ModSquadFeaturePyramid(config, 8).eval()
    hidden_states = tuple(torch.randn(2, 2 + 16, config.hidden_size) for _ in range(5))
    changed = list(hidden_states)
    changed[1 + 1] = torch.randn_like(hidden_states[2])  # block 1 only
    with torch.no_grad():
        before, after = pyramid(hidden_states, (32, 32)), pyramid(tuple(changed), (32, 32))
    assert [not torch.equal(a, b) for a, b in zip(before, after)] == [False, True, False, False]


def test_tokens_to_grid_drops_prefix_tokens_and_keeps_row_major_order():
    grid_height, grid_width = 3, 5
    patches = torch.arange(grid_height * grid_width, dtype=torch.float32)
    tokens = torch.cat([torch.tensor([-1.0, -2.0]), patches]).view(1, -1, 1).expand(2, -1, 4)
    grid = tokens_to_grid(tokens, (grid_height, grid_width))
    assert grid.shape == (2, 4, grid_height, grid_width)
    assert grid[1, 3, 2, 4] == 2 * grid_width + 4
    with pytest.raises(ValueError, match="4x4 patch grid needs 18"):
        tokens_to_grid(tokens, (4, 4))


def test_upsample2x_equals_a_2x2_stride2_transposed_conv():
    in_channels, out_channels = 6, 4
    transposed = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
    upsample = ModSquadUpsample2x(in_channels, out_channels)
    with torch.no_grad():
        # pixel shuffle reads channel c * 4 + i * 2 + j into output channel c at offset (i, j)
        upsample[0].weight.copy_(transposed.weight.permute(1, 2, 3, 0).reshape(-1, in_channels, 1, 1))
        upsample[0].bias.copy_(transposed.bias.repeat_interleave(4))
        features = torch.randn(2, in_channels, 3, 5)
        torch.testing.assert_close(upsample(features), transposed(features))


def test_bad_widths_raise():
    config = tiny_config()
    with pytest.raises(ValueError, match="out_channels must be a positive int, got 0"):
        ModSquadFeaturePyramid(config, 0)
    with pytest.raises(ValueError, match="decoder_channels must be a positive int, got 'wide'"):
        dense_head_channels(dict(ALL_TASKS[1], decoder_channels="wide"))
    assert dense_head_channels(ALL_TASKS[1]) == 256


def test_missing_hidden_states_raise():
    pyramid = ModSquadFeaturePyramid(tiny_config(), 8)
    with pytest.raises(ValueError, match="output_hidden_states=True"):
        pyramid(None, (32, 32))
