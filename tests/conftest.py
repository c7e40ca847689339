"""Shared test fixtures: tiny configs that run in milliseconds on a CPU, the standard task entries, and the tiny
multi-task models (with trained-looking routing) and run folders of the pruning, model-card and Hub tests.

Tests take what they need as fixtures (`tiny_config`, `all_tasks`, `small_tasks`, `specialised_model`, ...); the
functions and constants below are their implementation."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

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

# The same tasks with small dense heads: the default 256-channel decoders would dominate the run time of the pruning,
# model-card and Hub tests.
SMALL_TASKS = {
    "cls": ALL_TASKS[0],
    "seg": {**ALL_TASKS[1], "decoder_channels": 8},
    "det": {**ALL_TASKS[2], "head_channels": 8},
    "depth": {**ALL_TASKS[3], "decoder_channels": 8},
}
SPECIALISED_EXPERTS = 8  # experts per MoE layer of `specialised_model`'s models


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


@pytest.fixture(name="tiny_config", scope="session")
def tiny_config_fixture():
    """The factory `tiny_config(tasks=None, **overrides)`: a 4-block, 64-wide config on 32x32 images."""
    return tiny_config


@pytest.fixture(name="fresh_tasks", scope="session")
def fresh_tasks_fixture():
    """The factory `fresh_tasks(small=False)`: fresh copies of the standard task entries by name (`cls`, `seg`, `det`,
    `depth`), with small dense heads if `small`. For module-scoped fixtures, which cannot take `all_tasks`."""

    def fresh_tasks(small: bool = False) -> dict[str, dict]:
        return copy.deepcopy(SMALL_TASKS if small else {task["name"]: task for task in ALL_TASKS})

    return fresh_tasks


@pytest.fixture(name="all_tasks")
def all_tasks_fixture() -> list[dict]:
    """A classification, a segmentation, a detection and a depth task entry (fresh copies)."""
    return copy.deepcopy(ALL_TASKS)


@pytest.fixture(name="small_tasks")
def small_tasks_fixture() -> dict[str, dict]:
    """The four task entries by name (`cls`, `seg`, `det`, `depth`) with small dense heads (fresh copies)."""
    return copy.deepcopy(SMALL_TASKS)


@pytest.fixture(name="specialised_experts", scope="session")
def specialised_experts_fixture() -> int:
    """The number of experts per MoE layer of `specialised_model`'s models."""
    return SPECIALISED_EXPERTS


@pytest.fixture(name="specialise", scope="session")
def specialise_fixture():
    """The function `specialise(model, seed=0)`: makes a model's routing look trained (see the function)."""
    return specialise


@pytest.fixture(name="specialised_model", scope="session")
def specialised_model_fixture():
    """The factory `specialised_model(tasks, seed=0, **overrides)`: a tiny multi-task model whose tasks prefer
    different experts (see `specialised_model`)."""
    return specialised_model


@pytest.fixture(name="pixel_loader", scope="session")
def pixel_loader_fixture():
    """The factory `pixel_loader(seed, batches=2, batch_size=2)`: a stand-in DataLoader of random images."""
    return pixel_loader


@pytest.fixture(name="make_run_folder", scope="session")
def make_run_folder_fixture():
    """The factory `make_run_folder(root, tasks, seed=0, **overrides)`: a run folder as training leaves it."""
    return make_run_folder


@pytest.fixture(name="bright_shapes", scope="session")
def bright_shapes_fixture():
    """The factory `bright_shapes(num_images, size, generator)` (see the function)."""
    return bright_shapes


@pytest.fixture(name="count_checkpoints")
def count_checkpoints_fixture(monkeypatch):
    """The factory `count_checkpoints(module)`: wraps the `checkpoint` (torch's activation checkpointing) that `module`
    imported so that its calls are counted, and returns the list that grows by one per call."""

    def count_checkpoints(module) -> list:
        calls = []
        real_checkpoint = module.checkpoint

        def counted(function, *args, **kwargs):
            calls.append(function)
            return real_checkpoint(function, *args, **kwargs)

        monkeypatch.setattr(module, "checkpoint", counted)
        return calls

    return count_checkpoints


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


def specialise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Makes routing look trained: every routed input gets a common offset `d` (the pre-router LayerNorm's bias) and
    each task's router rows point along `+d` for about half the experts and `-d` for the rest, so each task routes to
    its own subset and never to the others. Heads get small random weights so predictions depend on the experts."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    direction = torch.randn(config.hidden_size, generator=generator)
    direction /= direction.norm()
    with torch.no_grad():
        for block in model.modsquad.layers:
            for norm, part in ((block.norm1, block.attention), (block.norm2, block.mlp)):
                router = getattr(part, "router", None)
                if router is None:
                    continue
                norm.bias.copy_(4.0 * direction)
                experts = router.num_experts
                for task in range(config.num_tasks):
                    favoured = torch.randperm(experts, generator=generator)[: experts // 2 + task % 2]
                    sign = -torch.ones(experts)
                    sign[favoured] = 1.0
                    noise = 0.3 * torch.randn(experts, config.hidden_size, generator=generator)
                    router.weight[task] = noise + 3.0 * sign[:, None] * direction
        for name, parameter in model.named_parameters():
            if name.startswith("heads."):
                parameter.normal_(0.0, 0.2, generator=generator)
    return model.eval()


def specialised_model(tasks: list[dict], seed: int = 0, **overrides) -> modsquad.ModSquadForMultiTask:
    """The same model for the same arguments, whatever the global random state (module fixtures are built at
    different moments depending on which tests run)."""
    overrides.setdefault("num_experts", SPECIALISED_EXPERTS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = modsquad.ModSquadForMultiTask(tiny_config(tasks, **overrides))
    return specialise(model, seed)


def pixel_loader(seed: int, batches: int = 2, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    """A stand-in DataLoader: batch dicts of random images (what `build_task_dataloader` yields)."""
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator)} for _ in range(batches)]


def make_run_folder(
    root: Path, tasks: list[dict], seed: int = 0, **overrides
) -> modsquad.ModSquadForMultiTask:
    """A run folder as training leaves it: `model/` (weights + processor), `metrics.json`, `recipe.yaml`."""
    model = specialised_model(tasks, seed, **overrides)
    model.save_pretrained(root / "model")
    modsquad.ModSquadImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    metrics = {
        t["name"]: {"accuracy" if t["type"] == "image-classification" else "score": 0.75} for t in tasks
    }
    (root / "metrics.json").write_text(json.dumps(metrics))
    recipe = "tasks:\n" + "".join(
        f"  - {{name: {t['name']}, dataset: {{path: modsquad-test/shapes-{t['name']}}}}}\n" for t in tasks
    )
    (root / "recipe.yaml").write_text(recipe)
    return model
