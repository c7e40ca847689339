"""`modsquad demo --max-minutes`: the demo prints how long the whole job has left after its first steps, stops training
at the budget and still evaluates, prunes and writes everything, saying in metrics.json and on the console that
training was cut short. The training loop's clock is injected (10 s per step), so the test does not depend on the
machine's speed."""

from __future__ import annotations

import functools
import itertools
import json

import pytest

from modsquad.cli import main
from modsquad.commands.demo import after_training_seconds
from modsquad.training import trainer as trainer_module
from modsquad.training.budget import StepClock
from modsquad.training.trainer import TaskData

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.mark.slow
def test_demo_stops_at_the_budget_and_still_writes_everything(tmp_path, monkeypatch, capsys):
    ten_seconds_per_step = functools.partial(StepClock, clock=itertools.count(0.0, 10.0).__next__)
    monkeypatch.setattr(trainer_module, "StepClock", ten_seconds_per_step)
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--max-steps", "20", "--num-train", "8", "--num-val", "4"]
    assert main([*argv, "--max-minutes", "1.5"]) == 0
    printed = capsys.readouterr().out

    # After 1 + 5 steps (60 s of the 90 s budget) the demo plans 9 of the 20 steps and says so.
    assert "~" in printed and " left: training ~30 s (10.00 s/step)" in printed
    assert "the 1.5 min budget fits 9 of 20 steps" in printed
    assert "training was cut short at the 1.5 min budget: 9 of 20 steps" in printed

    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 9 and summary["planned_steps"] == 20 and summary["training_cut_short"] is True
    assert summary["max_minutes"] == 1.5
    assert summary["estimate"]["at_step"] == 6 and summary["estimate"]["training_seconds_left"] == 30.0
    assert summary["estimate"]["after_training_seconds"] > 0
    # Everything a finished demo writes: metrics of every task, the final model, usage maps, pruned tasks.
    assert set(summary["metrics"]) == {"cls", "det", "seg", "depth"}
    assert (out / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "expert_usage").glob("*.png"))
    for task in ("cls", "det", "seg", "depth"):
        assert (out / "tasks" / task / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 9


def test_after_training_estimate_counts_the_images_each_phase_reads():
    def task(num_train: int, num_val: int, batch_size: int) -> TaskData:
        return TaskData("t", list(range(num_train)), None, batch_size, eval_dataset=list(range(num_val)))

    small = [task(512, 64, 32), task(512, 64, 16)]
    larger_validation = [task(512, 128, 32), task(512, 128, 16)]
    fixed = after_training_seconds(small, seconds_per_step=0.0)  # what does not scale with images
    assert fixed > 0
    assert after_training_seconds(small, 2.0) - fixed == pytest.approx(
        2 * after_training_seconds(small, 1.0) - 2 * fixed
    )
    assert after_training_seconds(larger_validation, 1.0) > after_training_seconds(small, 1.0)
