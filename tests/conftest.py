"""Shared test helpers: tiny configs that run in milliseconds on a CPU."""

from __future__ import annotations

import copy
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
    if overrides.get("moe_attention") and "attention_expert_heads" not in overrides:
        # Two attention experts of two heads per token (the config's default, one head per expert and as many
        # experts per token as heads, would take all four experts of a tiny block).
        kwargs["attention_experts_per_tok"] = 2
    kwargs.update(overrides)
    return modsquad.ModSquadConfig(**kwargs)


@pytest.fixture(name="tiny_config")
def tiny_config_fixture():
    """The factory `tiny_config(tasks=None, **overrides)`: a 4-block, 64-wide config on 32x32 images."""
    return tiny_config


@pytest.fixture(name="all_tasks")
def all_tasks_fixture() -> list[dict]:
    """A classification, a segmentation, a detection and a depth task entry (fresh copies)."""
    return copy.deepcopy(ALL_TASKS)


@pytest.fixture(name="bright_shapes")
def bright_shapes_fixture():
    """The factory `bright_shapes(num_images, size, generator)` (see the function)."""
    return bright_shapes


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: a second thread only adds synchronisation, and on a machine
    other processes keep busy it made training steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons: every training run of a test starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def bright_shapes(
    num_images: int, size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dark noisy images (values in [0, 1]) with two bright squares or discs each, and the `(num_images, size,
    size)` boolean map of shape pixels. Draws from `generator`, so a caller may go on drawing after it."""
    images = 0.2 + 0.05 * torch.rand(num_images, 3, size, size, generator=generator)
    shapes = torch.zeros(num_images, size, size, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for image, shape in zip(images, shapes):
        for _ in range(2):
            side = int(torch.randint(8, 15, (1,), generator=generator))
            top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
            if torch.rand(1, generator=generator) < 0.5:
                inside = (yy >= top) & (yy < top + side) & (xx >= left) & (xx < left + side)
            else:
                radius = side / 2
                inside = (yy - top - radius + 0.5) ** 2 + (xx - left - radius + 0.5) ** 2 <= radius**2
            image[:, inside] = 0.5 + 0.5 * torch.rand(3, 1, generator=generator)
            shape |= inside
    return images, shapes
