"""Two CPU processes (gloo) through `accelerate launch training/train.py`: replicas stay bit-identical, heads of tasks
absent from a step raise no DDP unused-parameter error, and data-parallel training equals single-process training
on the same global batches (which holds only if the MI statistics are all-reduced and its gradient scaled right)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from modsquad.commands.train import train_recipe
from modsquad.training.recipe import load_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[2]
DEMO = {"demo": True, "num_train": 16, "num_val": 4, "image_size": 32, "seed": 0}
MODEL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": 32,
    "moe_layers": "all",
    "mi_loss_coef": 0.1,
}


def recipe_file(tmp_path: Path, tasks: list[dict], **sections) -> Path:
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"config": MODEL},
        "tasks": tasks,
        "optimization": {"learning_rate": 3e-3, "warmup_steps": 0},
        "training": {"max_steps": 3, "log_every": 1, "eval_at_end": False, "tracker": "none", "cpu": True},
        **sections,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def assert_one_process_matches(
    recipe: Path, run: Path, log: list[dict], single_dir: Path, *overrides: str
) -> None:
    """Trains `recipe` (with `overrides`) on one process with the two processes' batches joined (batch 8 per task),
    and checks that it ends with the 2-process run's weights and per-step losses."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    single = load_recipe(
        recipe, [*overrides, "tasks.cls.batch_size=8", "tasks.cls2.batch_size=8", f"output_dir={single_dir}"]
    )
    result = train_recipe(single)
    distributed = load_file(str(run / "final" / "model.safetensors"))
    for name, param in result.model.state_dict().items():
        assert torch.allclose(distributed[name], param, atol=2e-5), name
    for ours, theirs in zip(result.history, log):
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        assert ours["mi_loss"] == pytest.approx(theirs["mi_loss"], abs=1e-6)


def test_two_processes_match_one_process_on_the_same_global_batches(tmp_path, launch_two_processes):
    # Two classification tasks (the demo's shapes, drawn in two orders): their losses are batch means, so two
    # processes with 4 images each must give the gradient of one process with the same 8 images.
    tasks = [
        {"name": "cls", "dataset": DEMO, "batch_size": 4, "image_size": 32, "augment": True},
        {"name": "cls2", "dataset": {**DEMO, "demo_task": "cls"}, "batch_size": 4, "image_size": 32},
    ]
    recipe = recipe_file(tmp_path / "ddp", tasks)
    launch_two_processes(recipe)
    run = tmp_path / "ddp" / "run"
    digests = json.loads((run / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3]
    assert log[-1]["mi_loss"] < 0  # two tasks in every step: the MI loss is live
    assert_one_process_matches(recipe, run, log, tmp_path / "single")


def test_sampled_strategy_leaves_heads_out_without_ddp_errors(tmp_path, launch_two_processes):
    # One task per step: in every step one of the two heads gets no gradient on either process.
    tasks = [
        {"name": "cls", "dataset": DEMO, "batch_size": 2, "image_size": 32},
        {"name": "seg", "dataset": DEMO, "batch_size": 2, "image_size": 32, "head": {"decoder_channels": 8}},
    ]
    recipe = recipe_file(tmp_path, tasks, mixing={"strategy": "uniform", "tasks_per_step": 1})
    launch_two_processes(recipe, "training.max_steps=4", "training.save_every=2")
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert all(("loss/cls" in line) != ("loss/seg" in line) for line in log)  # exactly one task per step
    assert {"loss/cls", "loss/seg"} <= {key for line in log for key in line}
    digests = json.loads((run / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    checkpoint = run / "checkpoints" / "step_00000004"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()


@pytest.mark.slow
def test_one_task_graph_at_a_time_keeps_replicas_identical_and_matches_one_process(
    tmp_path, launch_two_processes
):
    # Each task micro-batch runs its own forward and backward under DDP (no_sync on all but the last backward of an
    # optimizer step), with gradient accumulation and single-task steps; the streaming MI statistics are all-reduced.
    tasks = [
        {"name": "cls", "dataset": DEMO, "batch_size": 4, "image_size": 32},
        {"name": "cls2", "dataset": {**DEMO, "demo_task": "cls"}, "batch_size": 4, "image_size": 32},
    ]
    recipe = recipe_file(
        tmp_path / "ddp",
        tasks,
        mixing={"strategy": "uniform", "tasks_per_step": 2},
        optimization={"learning_rate": 3e-3, "warmup_steps": 0, "mi_estimator": "streaming", "mi_horizon": 4},
    )
    overrides = ["training.one_task_at_a_time=true", "training.gradient_accumulation_steps=2"]
    launch_two_processes(recipe, *overrides)
    run = tmp_path / "ddp" / "run"
    digests = json.loads((run / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3]
    assert log[-1]["mi_loss"] < 0
    assert_one_process_matches(recipe, run, log, tmp_path / "single", *overrides)
