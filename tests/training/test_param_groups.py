"""Layer-wise learning rates: new parameters (heads, routers, task tokens, loss log-variances) at `learning_rate`, the
pretrained backbone at `backbone_learning_rate` decayed per layer (BEiT), weight decay only on matrices; the groups'
rates in the training log, and an exact resume."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, TensorDataset

from modsquad import ModSquadForMultiTask
from modsquad.data.mixing import subset
from modsquad.training.recipe import load_recipe
from modsquad.training.step import MultiTaskStep, TaskLossWeighting
from modsquad.training.trainer import TaskData, build_optimizer, train

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

TASKS = [
    {"name": "colour", "type": "image-classification", "num_labels": 3},
    {"name": "bright", "type": "image-classification", "num_labels": 2},
]


def training_step(tiny_config, **overrides) -> MultiTaskStep:
    model = ModSquadForMultiTask(tiny_config(TASKS, **overrides))
    return MultiTaskStep(model, TaskLossWeighting(model.config.task_names, mode="uncertainty"))


def groups_by_parameter(optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def test_layer_decay_gives_each_backbone_layer_its_rate_and_new_parameters_the_base_rate(tiny_config):
    step = training_step(
        tiny_config, moe_attention=True
    )  # 4 blocks; MLP and attention experts in blocks 1 and 3
    optimizer = build_optimizer(step, 1e-3, 0.05, (0.9, 0.999), backbone_learning_rate=1e-4, layer_decay=0.5)
    group_of = groups_by_parameter(optimizer)
    params = dict(step.named_parameters())
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)  # every parameter, once

    def rate(name: str) -> float:
        return group_of[id(params[name])]["lr"]

    backbone = "model.modsquad."
    # New: heads, routers (MLP and attention), task tokens, loss log-variances.
    for name in (
        "model.heads.colour.classifier.weight",
        f"{backbone}layers.1.mlp.router.weight",
        f"{backbone}layers.3.attention.router.weight",
        f"{backbone}embeddings.task_tokens",
        "weighting.log_vars",
    ):
        assert rate(name) == pytest.approx(1e-3), name
        assert group_of[id(params[name])]["name"] == "new"
    # Backbone, BEiT layer ids: embeddings 0, block i -> i + 1, final norm 5 = L + 1; rate 1e-4 * 0.5 ** (5 - id).
    expected = {
        f"{backbone}embeddings.patch_embeddings.projection.weight": 0,
        f"{backbone}embeddings.cls_token": 0,
        f"{backbone}embeddings.position_embeddings": 0,
        f"{backbone}layers.0.attention.q_proj.weight": 1,
        f"{backbone}layers.1.mlp.experts.up_proj": 2,  # experts are pretrained (upcycled from the dense MLP)
        f"{backbone}layers.1.attention.q_proj": 2,
        f"{backbone}layers.2.norm2.weight": 3,
        f"{backbone}layers.3.mlp.experts.down_proj_bias": 4,
        f"{backbone}layernorm.weight": 5,
    }
    for name, layer in expected.items():
        group = group_of[id(params[name])]
        assert (group["layer_id"], group["name"]) == (layer, f"backbone.layer_{layer:02d}"), name
        assert rate(name) == pytest.approx(1e-4 * 0.5 ** (5 - layer)), name
    # Weight decay on matrices only, whatever the learning rate.
    decayed = {name for name in params if group_of[id(params[name])]["weight_decay"] == 0.05}
    assert (
        f"{backbone}layers.1.mlp.experts.up_proj" in decayed
        and "model.heads.colour.classifier.weight" in decayed
    )
    for name in ("layernorm.weight", "layers.1.mlp.experts.up_proj_bias", "embeddings.position_embeddings"):
        assert backbone + name not in decayed
    # A fixed order: new first, then the layers upwards, the decayed half of each before the other.
    order = [(g["name"], g["weight_decay"]) for g in optimizer.param_groups]
    assert order[:2] == [("new", 0.05), ("new", 0.0)]
    assert [name for name, _ in order[2::2]] == [f"backbone.layer_{i:02d}" for i in range(6)]


def test_default_and_backbone_only_groupings(tiny_config):
    step = training_step(tiny_config)
    default = build_optimizer(step, 1e-3, 0.05, (0.9, 0.999))
    # The historical two groups: every parameter at one rate, decayed or not.
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in default.param_groups] == [
        ("all", 1e-3, 0.05),
        ("all", 1e-3, 0.0),
    ]
    split = build_optimizer(step, 1e-3, 0.05, (0.9, 0.999), backbone_learning_rate=2e-4)
    assert [(g["name"], g["lr"]) for g in split.param_groups] == [
        ("new", 1e-3),
        ("new", 1e-3),
        ("backbone", 2e-4),
        ("backbone", 2e-4),
    ]


def test_recipe_rejects_bad_layer_wise_rates():
    tasks = [{"name": "a", "type": "image-classification"}]
    with pytest.raises(
        ValueError, match=r"optimization.layer_decay must be a finite number in \(0, 1\], got 1.5"
    ):
        load_recipe(tasks=tasks, optimization={"layer_decay": 1.5})
    with pytest.raises(
        ValueError, match=r"optimization.backbone_learning_rate must be a finite number > 0 or null, got 0"
    ):
        load_recipe(tasks=tasks, optimization={"backbone_learning_rate": 0})


def as_batch(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}


def colour_tasks() -> list[TaskData]:
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for name, classes in (("colour", 3), ("bright", 2)):
        labels = torch.randint(0, classes, (24,), generator=generator)
        images = torch.randn(24, 3, 32, 32, generator=generator) * 0.3 + labels.view(-1, 1, 1, 1) * 0.5
        data = TensorDataset(images, labels)

        def make_loader(rows, epoch, data=data):
            return DataLoader(subset(data, rows), batch_size=8, collate_fn=as_batch)

        tasks.append(TaskData(name, data, make_loader, 8))
    return tasks


@pytest.mark.slow
def test_group_rates_are_logged_and_resume_is_exact(tmp_path, tiny_config):
    """4 steps straight (checkpoint at step 2) vs. a new run resumed from that checkpoint: the same logged rates of
    every group, the same losses, the same weights."""

    def run(name: str, resume: str | None = None):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.manual_seed(0)
        model = ModSquadForMultiTask(tiny_config(TASKS, router_noise_std=0.5))
        recipe = load_recipe(
            tasks=[{"name": t["name"]} for t in TASKS],
            output_dir=str(tmp_path / name),
            resume=resume,
            optimization={
                "learning_rate": 2e-3,
                "backbone_learning_rate": 5e-4,
                "layer_decay": 0.8,
                "warmup_steps": 1,
                "loss_weighting": "uncertainty",
            },
            training={
                "max_steps": 4,
                "save_every": 2,
                "log_every": 1,
                "eval_at_end": False,
                "tracker": "none",
            },
        )
        return train(recipe, model=model, tasks=colour_tasks())

    straight = run("straight")
    # Every group follows the one schedule at its own peak: 2e-3 new, 5e-4 * 0.8 ** (5 - layer) for the backbone.
    for line in straight.history:
        assert line["lr/new"] == pytest.approx(line["lr"])
        for layer in range(6):
            assert line[f"lr/backbone.layer_{layer:02d}"] == pytest.approx(
                line["lr"] / 4 * 0.8 ** (5 - layer)
            )
    assert straight.history[0]["lr"] == pytest.approx(2e-3)  # logged after the step: the next step's rate
    assert straight.history[-1]["lr"] < straight.history[1]["lr"] < 2e-3

    resumed = run("resumed", resume=str(tmp_path / "straight" / "checkpoints" / "step_00000002"))
    assert [line["step"] for line in resumed.history] == [3, 4]
    for expected, got in zip(straight.history[2:], resumed.history, strict=True):
        assert set(got) == set(expected)
        for key in got:
            if key != "time":
                assert got[key] == pytest.approx(expected[key], abs=1e-6), (got["step"], key)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
