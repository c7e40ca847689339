"""Fixtures of the adaptation tests: small random dense ViT and DINOv2 models to upcycle."""

from __future__ import annotations

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

# The shape of every small dense checkpoint here (4 blocks, 64 wide, 8px patches on 32px images).
DENSE_SHAPE = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu"
)


def randomised(model):
    """A dense model with weights far from their init (unit layer scales or zero biases would hide mapping, slicing
    and scaling bugs)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def vit() -> ViTModel:
    return randomised(ViTModel(ViTConfig(intermediate_size=128, **DENSE_SHAPE)))


def dinov2() -> Dinov2Model:
    return randomised(Dinov2Model(Dinov2Config(mlp_ratio=2, **DENSE_SHAPE)))


@pytest.fixture(name="dense_shape")
def dense_shape_fixture() -> dict:
    """The config fields of the small dense checkpoints (a fresh copy)."""
    return dict(DENSE_SHAPE)


@pytest.fixture(name="randomised", scope="session")
def randomised_fixture():
    """The function `randomised(model)`: moves every weight away from its init (see the function)."""
    return randomised


@pytest.fixture(name="vit", scope="session")
def vit_fixture():
    """The factory `vit()`: a small random dense `ViTModel`."""
    return vit


@pytest.fixture(name="dinov2", scope="session")
def dinov2_fixture():
    """The factory `dinov2()`: a small random dense `Dinov2Model` (layer scales)."""
    return dinov2


@pytest.fixture(name="make_dense", params=["vit", "dinov2"])
def make_dense_fixture(request):
    """Each dense model factory in turn (`vit`, `dinov2`): tests taking it run once per dense model type."""
    return {"vit": vit, "dinov2": dinov2}[request.param]
