"""The multi-task trainer: recipes, the MI loss over a whole step, loss going down, exact resume after SIGTERM."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch.utils.data import DataLoader, Dataset

from modsquad import ModSquadConfig, ModSquadForMultiTask
from modsquad.data.demo import demo_task_configs
from modsquad.data.mixing import MultiTaskMixer, subset
from modsquad.training.checkpointing import list_checkpoints
from modsquad.training.recipe import load_recipe
from modsquad.training.step import MultiTaskStep, TaskLossWeighting
from modsquad.training.trainer import TaskData, train

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
TWO_TASKS = [
    {"name": "colour", "type": "image-classification", "num_labels": 3},
    {"name": "bright", "type": "image-classification", "num_labels": 2},
]


class ColourImages(Dataset):
    """32x32 images whose label is which colour channel is lit (`mode="colour"`) or whether they are bright."""

    def __init__(self, size: int, mode: str, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(size, 3, 32, 32, generator=generator) * 0.3
        if mode == "colour":
            self.labels = torch.randint(0, 3, (size,), generator=generator)
            for i, label in enumerate(self.labels):
                self.images[i, label] += 1.0
        else:
            self.labels = torch.randint(0, 2, (size,), generator=generator)
            self.images += (self.labels.float() * 2 - 1).view(-1, 1, 1, 1) * 0.5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def colour_tasks(batch_size: int = 8) -> list[TaskData]:
    def loader(dataset):
        return lambda rows, epoch: DataLoader(subset(dataset, rows), batch_size=batch_size)

    colour, bright = ColourImages(48, "colour", 0), ColourImages(40, "bright", 1)
    return [
        TaskData("colour", colour, loader(colour), batch_size),
        TaskData("bright", bright, loader(bright), batch_size),
    ]


def recipe_for(tmp_path, **sections):
    raw = {"tasks": [{"name": t["name"]} for t in TWO_TASKS], "output_dir": str(tmp_path / "run")}
    raw["training"] = {"log_every": 1, "eval_at_end": False, "tracker": "csv", **sections.pop("training", {})}
    raw.update(sections)
    return load_recipe(**raw)


# ------------------------------------------------------------------------------------------------------- recipes
def test_recipe_yaml_overrides_and_errors(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "tasks:\n  - {name: cls, type: image-classification, batch_size: 4}\n  - {name: seg, batch_size: 2}\n"
        "optimization: {learning_rate: 3e-4}\n"
    )
    recipe = load_recipe(path, ["tasks.seg.batch_size=6", "training.max_steps=7", "mixing.strategy=uniform"])
    assert recipe.optimization.learning_rate == pytest.approx(3e-4)  # YAML 1.1 would read "3e-4" as a string
    assert [t.batch_size for t in recipe.tasks] == [4, 6]
    assert (recipe.training.max_steps, recipe.mixing.strategy) == (7, "uniform")
    with pytest.raises(ValueError, match="unknown training key\\(s\\) 'batch'"):
        load_recipe(path, ["training.batch=3"])
    with pytest.raises(ValueError, match="accepted"):
        load_recipe(path, ["mixing.strategy=roundrobin"])
    with pytest.raises(ValueError, match="no item 'depth'"):
        load_recipe(path, ["tasks.depth.batch_size=1"])


@pytest.mark.parametrize("name", ["demo", "paper_imagenet_coco_ade20k", "real_shared_data"])
def test_shipped_recipes_build_valid_model_configs(name):
    path = REPO / "training" / "configs" / f"{name}.yaml"
    # real_shared_data reads data the repository does not have: its paths must be given.
    overrides = [f"tasks.{t}.dataset.path=/data/{t}" for t in ("cls", "det", "seg", "depth")]
    recipe = load_recipe(path, overrides if name == "real_shared_data" else [])
    demo_types = {entry["name"]: entry["type"] for entry in demo_task_configs()}
    entries = []
    for task in recipe.tasks:
        entry = {"name": task.name, "type": task.type or demo_types[task.name], **task.head}
        if entry["type"] != "depth-estimation" and "num_labels" not in entry:
            entry["num_labels"] = len(task.labels) if task.labels else 3
        entries.append(entry)
    config = ModSquadConfig(tasks=entries, **recipe.model.config)
    assert config.moe_layer_indices and config.task_names == recipe.task_names


# ------------------------------------------------------------------------------------------- the step's MI loss
def test_mi_loss_spans_the_tasks_of_a_step_and_reaches_the_routers(tiny_config):
    model = ModSquadForMultiTask(tiny_config(TWO_TASKS, mi_loss_coef=1.0, z_loss_coef=0.0))
    with torch.no_grad():  # routers start at zero (uniform, MI = 0): give the tasks different routing
        for name, param in model.named_parameters():
            if "router" in name:
                param.normal_(0, 0.5)
    # Task weights 0: the step's loss is the MI loss alone, so router gradients can only come from it.
    step = MultiTaskStep(model, TaskLossWeighting(model.config.task_names, [0.0, 0.0]))
    images = torch.randn(4, 3, 32, 32)
    both = [("colour", {"pixel_values": images, "labels": torch.tensor([0, 1, 2, 0])}),
            ("bright", {"pixel_values": images, "labels": torch.tensor([0, 1, 1, 0])})]  # fmt: skip
    out = step(both)
    assert out.mi_loss < 0  # -I(T;E) of two differently routed tasks
    assert torch.allclose(out.loss, out.mi_loss)
    out.loss.backward()
    router_grads = [p.grad for n, p in model.named_parameters() if "router" in n]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)

    model.zero_grad()
    out = step(both[:1] * 2)  # two batches, but one task: MI is identically zero and is not added
    assert out.mi_loss == 0
    assert out.loss.grad_fn is not None and out.task_counts.tolist() == [2.0, 0.0]


def test_uncertainty_weighting_learns_log_variances():
    weighting = TaskLossWeighting(["a", "b"], [1.0, 2.0], mode="uncertainty")
    total = weighting(0, torch.tensor(3.0)) + weighting(1, torch.tensor(0.5))
    total.backward()
    # d/ds [w exp(-s) L + s] at s = 0 is 1 - w L
    assert weighting.log_vars.grad.tolist() == pytest.approx([1 - 3.0, 1 - 1.0])
    assert weighting.effective_weights() == {"a": 1.0, "b": 2.0}


# ---------------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_short_run_reduces_the_loss(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = ModSquadForMultiTask(tiny_config(TWO_TASKS))
    recipe = recipe_for(
        tmp_path,
        training={"max_steps": 30},
        optimization={"learning_rate": 3e-3, "warmup_steps": 3, "loss_weighting": "uncertainty"},
    )
    result = train(recipe, model=model, tasks=colour_tasks())
    losses = [line["loss/colour"] + line["loss/bright"] for line in result.history]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert any(line["mi_loss"] < 0 for line in result.history)
    # The run folder: log lines, tracker rows, the final model and the usage EMA.
    logged = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == list(range(1, 31))
    assert (tmp_path / "run" / "logs" / "tracker" / "metrics.csv").is_file()
    reloaded = ModSquadForMultiTask.from_pretrained(result.final_dir)
    assert torch.equal(reloaded.heads["colour"].classifier.weight, model.heads["colour"].classifier.weight)
    usage = json.loads((tmp_path / "run" / "expert_usage_ema.json").read_text())
    assert sum(usage["colour"][0]) == pytest.approx(1.0)


@pytest.mark.slow
@pytest.mark.parametrize("mi_estimator", ["step", "streaming"])
def test_resume_after_sigterm_reproduces_the_uninterrupted_run(
    tmp_path, monkeypatch, tiny_config, mi_estimator
):
    """6 steps straight vs. SIGTERM during step 3 (checkpoint, exit) + `resume="latest"`: bit-identical per-step
    losses and final weights.

    Uses gradient accumulation (2 micro-steps per optimizer step), the temperature strategy (its task draws and the
    streams' positions must be restored) and uncertainty weighting (extra trained parameters); with the streaming
    MI estimator (its running estimate must be restored), one task graph at a time."""
    sections = {
        "training": {"max_steps": 6, "gradient_accumulation_steps": 2, "save_every": 2, "keep_last": 2},
        "mixing": {"strategy": "temperature", "temperature": 2.0},
        "optimization": {"learning_rate": 2e-3, "warmup_steps": 2, "loss_weighting": "uncertainty"},
    }
    if mi_estimator == "streaming":
        sections["optimization"].update(mi_estimator="streaming", mi_horizon=3)
        sections["training"]["one_task_at_a_time"] = True

    def run(name: str, resume: str | None = None):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        torch.manual_seed(0)
        model = ModSquadForMultiTask(tiny_config(TWO_TASKS, router_noise_std=0.5))  # noise: RNG state matters
        recipe = recipe_for(tmp_path / name, resume=resume, **sections)
        return train(recipe, model=model, tasks=colour_tasks())

    straight = run("straight")
    assert [c.name for c in list_checkpoints(tmp_path / "straight" / "run")] == [
        "step_00000004",
        "step_00000006",
    ]

    original_next_step = MultiTaskMixer.next_step

    def next_step_with_sigterm(self):
        if self.step == 4:  # micro-step 4 = first micro-step of optimizer step 3
            signal.raise_signal(signal.SIGTERM)
        return original_next_step(self)

    monkeypatch.setattr(MultiTaskMixer, "next_step", next_step_with_sigterm)
    interrupted = run("interrupted")
    monkeypatch.setattr(MultiTaskMixer, "next_step", original_next_step)
    assert interrupted.interrupted == signal.SIGTERM and interrupted.step == 3
    assert interrupted.checkpoint.name == "step_00000003"
    resumed = run("interrupted", resume="latest")
    assert resumed.interrupted is None and resumed.step == 6

    log = [
        json.loads(x)
        for x in (tmp_path / "interrupted" / "run" / "training_log.jsonl").read_text().splitlines()
    ]
    assert [line["step"] for line in log] == [1, 2, 3, 4, 5, 6]
    assert any(line["mi_loss"] < 0 for line in log)
    for expected, got in zip(straight.history, log):
        for key in ("loss", "mi_loss", "loss/colour", "loss/bright", "lr", "weight/colour"):
            assert got.get(key) == expected.get(key), (expected["step"], key)
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
