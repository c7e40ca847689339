"""The simple feature pyramid that dense heads read: levels, strides, shapes, which block feeds which level."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modsquad import ModSquadForMultiTask, ModSquadModel, ModSquadModelOutput
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
        backbone_output = backbone(pixel_values, output_hidden_states=True)
        return pyramid, pyramid(backbone_output, pixel_values.shape[-2:])


@pytest.mark.parametrize(
    ("patch_size", "scales"),
    [(16, (4.0, 2.0, 1.0, 0.5)), (8, (4.0, 2.0, 1.0, 0.5)), (2, (2.0, 1.0, 0.5)), (1, (1.0, 0.5))],
)
def test_scales_follow_the_patch_size(patch_size, scales):
    assert pyramid_scales(patch_size) == scales


def test_patch16_gives_strides_4_to_32_on_non_square_input(tiny_config):
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
def test_level_shapes_with_8px_patches(height, width, expected, tiny_config):
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
def test_feature_layers_spread_over_levels(feature_layers, expected, tiny_config):
    config = tiny_config(num_hidden_layers=5, feature_layers=feature_layers)
    pyramid = ModSquadFeaturePyramid(config, 8)
    assert pyramid.level_layers == expected


def _backbone_output(hidden_states: tuple, last_hidden_state: torch.Tensor) -> ModSquadModelOutput:
    return ModSquadModelOutput(hidden_states=hidden_states, last_hidden_state=last_hidden_state)


def test_each_level_reads_its_own_block(tiny_config):
    config = tiny_config(feature_layers=[0, 1, 2, 3])
    pyramid = ModSquadFeaturePyramid(config, 8).eval()
    hidden_states = tuple(torch.randn(2, 2 + 16, config.hidden_size) for _ in range(5))
    final = torch.randn(2, 2 + 16, config.hidden_size)
    changed = list(hidden_states)
    changed[1 + 1] = torch.randn_like(hidden_states[2])  # block 1 only
    with torch.no_grad():
        before = pyramid(_backbone_output(hidden_states, final), (32, 32))
        after = pyramid(_backbone_output(tuple(changed), final), (32, 32))
    assert [not torch.equal(a, b) for a, b in zip(before, after)] == [False, True, False, False]


def test_the_last_block_is_read_through_the_backbones_final_layernorm(tiny_config):
    config = tiny_config(feature_layers=[0, 1, 2, 3])
    pyramid = ModSquadFeaturePyramid(config, 8).eval()
    hidden_states = tuple(torch.randn(2, 2 + 16, config.hidden_size) for _ in range(5))
    with torch.no_grad():
        before = pyramid(_backbone_output(hidden_states, torch.randn(2, 18, config.hidden_size)), (32, 32))
        # The raw output of the last block is not read; the final-normed `last_hidden_state` is.
        raw_changed = (*hidden_states[:-1], torch.randn_like(hidden_states[-1]))
        same = pyramid(
            _backbone_output(raw_changed, before_final := torch.randn(2, 18, config.hidden_size)), (32, 32)
        )
        again = pyramid(_backbone_output(hidden_states, before_final), (32, 32))
    assert all(torch.equal(a, b) for a, b in zip(same, again))
    assert [not torch.equal(a, b) for a, b in zip(before, again)] == [False, False, False, True]
    assert isinstance(pyramid.norms[3], nn.Identity)  # no LayerNorm of its own on top of the backbone's


def test_dense_models_train_the_final_layernorm(all_tasks, tiny_config):
    """With dense tasks only, every backbone parameter still gets a gradient (DDP's unused-parameter check)."""
    for task in all_tasks[1:]:
        task["head_channels" if task["type"] == "object-detection" else "decoder_channels"] = 8
    model = ModSquadForMultiTask(tiny_config(all_tasks[1:])).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = {
        "seg": torch.zeros(2, 32, 32, dtype=torch.long),
        "det": [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}] * 2,
        "depth": torch.rand(2, 32, 32) + 0.5,
    }
    for task, task_labels in labels.items():
        model.zero_grad(set_to_none=True)
        model(pixel_values, task=task, labels=task_labels).loss.backward()
        unused = [name for name, p in model.named_parameters() if p.grad is None and f"heads.{task}." in name]
        unused += [name for name, p in model.modsquad.named_parameters() if p.grad is None]
        assert unused == [], f"{task}: parameters without a gradient: {unused}"
        assert model.modsquad.layernorm.weight.grad.abs().sum() > 0


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


def test_bad_widths_raise(all_tasks, tiny_config):
    config = tiny_config()
    with pytest.raises(ValueError, match="out_channels must be a positive int, got 0"):
        ModSquadFeaturePyramid(config, 0)
    with pytest.raises(ValueError, match="decoder_channels must be a positive int, got 'wide'"):
        dense_head_channels(dict(all_tasks[1], decoder_channels="wide"))
    assert dense_head_channels(all_tasks[1]) == 256


def test_missing_hidden_states_raise(tiny_config):
    pyramid = ModSquadFeaturePyramid(tiny_config(), 8)
    without = _backbone_output(None, torch.randn(2, 18, 64))
    with pytest.raises(ValueError, match="hidden state of block 0: run it with output_hidden_states=True"):
        pyramid(without, (32, 32))
