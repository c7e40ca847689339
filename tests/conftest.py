"""Shared test helpers: tiny configs that run in milliseconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import modsquad  # registers the Auto classes

ALL_TASKS = [
    {"name": "cls", "type": "image-classification", "labels": ["circle", "square", "triangle"]},
    {"name": "seg", "type": "semantic-segmentation", "labels": ["background", "shape"]},
    {"name": "det", "type": "object-detection", "labels": ["circle", "square"]},
    {"name": "depth", "type": "depth-estimation"},
]


def tiny_config(tasks: list[dict] | None = None, **overrides) -> modsquad.ModSquadConfig:
    """A 4-block, 64-wide ModSquad config on 32x32 images with 8px patches (MoE in blocks 1 and 3)."""
    kwargs = dict(
        tasks=tasks if tasks is not None else [ALL_TASKS[0]],
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        expert_intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    kwargs.update(overrides)
    return modsquad.ModSquadConfig(**kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
