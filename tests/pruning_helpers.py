"""Shared by the pruning, model-card and Hub tests: tiny multi-task models whose tasks prefer different experts, and
run folders laid out as training leaves them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import tiny_config
from modsquad import ModSquadForMultiTask, ModSquadImageProcessor

# Small dense heads: the default 256-channel decoders would dominate the run time of these tests.
CLS_TASK = {"name": "cls", "type": "image-classification", "labels": ["circle", "square", "triangle"]}
SEG_TASK = {
    "name": "seg",
    "type": "semantic-segmentation",
    "labels": ["background", "shape"],
    "decoder_channels": 8,
}
DET_TASK = {"name": "det", "type": "object-detection", "labels": ["circle", "square"], "head_channels": 8}
DEPTH_TASK = {"name": "depth", "type": "depth-estimation", "decoder_channels": 8}
SMALL_TASKS = [CLS_TASK, SEG_TASK, DET_TASK, DEPTH_TASK]
NUM_EXPERTS = 8


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


def specialised_model(tasks: list[dict], seed: int = 0, **overrides) -> ModSquadForMultiTask:
    """The same model for the same arguments, whatever the global random state (module fixtures are built at
    different moments depending on which tests run)."""
    overrides.setdefault("num_experts", NUM_EXPERTS)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = ModSquadForMultiTask(tiny_config(tasks, **overrides))
    return specialise(model, seed)


def pixel_loader(seed: int, batches: int = 2, batch_size: int = 2) -> list[dict[str, torch.Tensor]]:
    """A stand-in DataLoader: batch dicts of random images (what `build_task_dataloader` yields)."""
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(batch_size, 3, 32, 32, generator=generator)} for _ in range(batches)]


def make_run_folder(root: Path, tasks: list[dict], seed: int = 0, **overrides) -> ModSquadForMultiTask:
    """A run folder as training leaves it: `model/` (weights + processor), `metrics.json`, `recipe.yaml`."""
    model = specialised_model(tasks, seed, **overrides)
    model.save_pretrained(root / "model")
    ModSquadImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    metrics = {
        t["name"]: {"accuracy" if t["type"] == "image-classification" else "score": 0.75} for t in tasks
    }
    (root / "metrics.json").write_text(json.dumps(metrics))
    recipe = "tasks:\n" + "".join(
        f"  - {{name: {t['name']}, dataset: {{path: modsquad-test/shapes-{t['name']}}}}}\n" for t in tasks
    )
    (root / "recipe.yaml").write_text(recipe)
    return model
