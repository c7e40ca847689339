"""The training time budget (`training.max_minutes`): the clock's pace and decisions, the schedule fitted to the steps
that fit, and runs that stop at the budget yet finish like any other. Clocks are injected, so nothing here depends
on the machine's speed."""

from __future__ import annotations

import functools
import itertools
import json

import pytest
import torch

from modsquad import ModSquadForMultiTask
from modsquad.training import trainer as trainer_module
from modsquad.training.budget import ESTIMATE_AFTER_STEPS, StepClock, format_minutes
from modsquad.training.recipe import load_recipe
from modsquad.training.trainer import TaskData, WarmupCosineSchedule, train

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

TASKS = [
    {"name": "colour", "type": "image-classification", "num_labels": 3},
    {"name": "bright", "type": "image-classification", "num_labels": 2},
]


def ticking_clock(seconds_per_call: float, start: float = 0.0):
    """A clock that advances `seconds_per_call` each time it is read (the loop reads it once per step)."""
    return itertools.count(start, seconds_per_call).__next__


# ---------------------------------------------------------------------------------------------------- the clock
def test_pace_leaves_out_the_first_step_and_the_budget_fits_the_remaining_steps():
    times = iter([0.0, 30.0, 40.0, 50.0, 60.0])  # start; step 1 took 30 s (warm-up), then 10 s per step
    clock = StepClock(max_minutes=2, clock=lambda: next(times))
    assert clock.seconds_per_step is None and not clock.out_of_time()
    clock.step_done(1)
    assert clock.seconds_per_step == 30.0  # nothing else to go by yet
    for step in (2, 3, 4):
        clock.step_done(step)
    assert clock.seconds_per_step == 10.0 and clock.elapsed_seconds == 60.0
    assert clock.steps_that_fit(max_steps=100) == 4 + 6  # 60 s left at 10 s per step
    assert clock.steps_that_fit(max_steps=7) == 7  # never more than planned
    assert not clock.out_of_time()

    estimate = clock.estimate(planned_steps=10, max_steps=100)
    assert estimate.training_seconds_left == 60.0
    assert "~1 min of training left" in estimate.describe() and "fits 10 of 100 steps" in estimate.describe()


def test_out_of_time_when_the_next_step_would_end_past_the_budget():
    clock = StepClock(max_minutes=0.5, clock=ticking_clock(10.0))  # 30 s, 10 s per step
    clock.step_done(1)
    clock.step_done(2)
    assert not clock.out_of_time()  # 20 s elapsed, the next step ends at 30 s
    clock.step_done(3)
    assert clock.out_of_time()
    assert clock.steps_that_fit(max_steps=50) == 3


def test_without_a_budget_the_clock_only_times():
    clock = StepClock(clock=ticking_clock(1000.0), first_step=40)  # a resumed run: its own steps only
    for step in range(41, 45):
        clock.step_done(step)
    assert clock.seconds_per_step == 1000.0 and clock.steps_timed == 3
    assert not clock.out_of_time() and clock.steps_that_fit(max_steps=500) == 500


@pytest.mark.parametrize("bad", [0, -1.0, True, "5"])
def test_bad_budgets_are_rejected_with_the_value(bad, tmp_path):
    with pytest.raises(ValueError, match="max_minutes must be a number > 0"):
        StepClock(max_minutes=bad)
    with pytest.raises(ValueError, match=r"training.max_minutes must be a finite number > 0 or null, got"):
        load_recipe(tasks=[{"name": "cls", "type": "image-classification"}], training={"max_minutes": bad})


def test_minutes_are_printed_rounded_up():
    assert [format_minutes(s) for s in (0.2, 59.0, 61.0, 600.0)] == ["1 s", "59 s", "2 min", "10 min"]


# ------------------------------------------------------------------------------------------------- the schedule
def test_fitted_schedule_decays_to_its_floor_at_the_new_end_and_is_not_saved():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=3, total_steps=100, min_lr_ratio=0.1)
    lrs = []
    for step in range(12):
        if step == 2:  # during warm-up: fitting changes nothing now
            before = schedule.get_last_lr()[0]
            schedule.fit(10)
            assert schedule.get_last_lr()[0] == before
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    # lrs[i] is the rate after step i + 1: the floor from step 10 on, where the fitted cosine ends.
    assert lrs[8] > 0.1 and lrs[9:] == pytest.approx([0.1] * 3)
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))  # decays without a jump up
    state = schedule.state_dict()
    assert not {"total_steps", "warmup_steps", "min_lr_ratio"} & set(state)
    fresh = WarmupCosineSchedule(optimizer, warmup_steps=3, total_steps=100, min_lr_ratio=0.1)
    fresh.load_state_dict(state)
    assert fresh.total_steps == 100  # a resumed run plans from its own recipe


def test_fit_never_moves_the_end_into_the_warm_up():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=30, total_steps=800)
    schedule.fit(5)
    assert schedule.total_steps == 31


# ----------------------------------------------------------------------------------------------------- training
def colour_tasks(batch_size: int = 4) -> list[TaskData]:
    from torch.utils.data import DataLoader

    from modsquad.data.mixing import subset

    generator = torch.Generator().manual_seed(0)
    data = []
    for num_labels in (3, 2):
        images = torch.randn(16, 3, 32, 32, generator=generator)
        labels = torch.randint(0, num_labels, (16,), generator=generator)
        data.append([{"pixel_values": image, "labels": label} for image, label in zip(images, labels)])

    def loader(rows_of):
        return lambda rows, epoch: DataLoader(subset(rows_of, rows), batch_size=batch_size)

    return [TaskData(task["name"], rows, loader(rows), batch_size) for task, rows in zip(TASKS, data)]


def budget_recipe(tmp_path, max_minutes: float, max_steps: int = 30):
    return load_recipe(
        tasks=[{"name": task["name"]} for task in TASKS],
        output_dir=str(tmp_path / "run"),
        optimization={"learning_rate": 1e-3, "warmup_steps": 2, "min_lr_ratio": 0.1},
        training={"max_steps": max_steps, "max_minutes": max_minutes, "log_every": 5, "tracker": "none"},
    )


def test_a_tiny_budget_stops_after_the_first_step_and_still_finishes_the_run(tiny_config, tmp_path, capsys):
    model = ModSquadForMultiTask(tiny_config(TASKS))
    result = train(budget_recipe(tmp_path, max_minutes=1e-9), model, colour_tasks())

    assert result.step == 1 and result.max_steps == 30 and result.out_of_time and result.interrupted is None
    assert [line["step"] for line in result.history] == [1]  # the last step is logged, as at a normal end
    run = tmp_path / "run"
    assert (run / "final" / "model.safetensors").is_file() and (run / "expert_usage_ema.json").is_file()
    logged = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged] == [1]
    assert "stopped at the 1e-09 min time budget after 1 of 30 steps" in capsys.readouterr().out


@pytest.mark.slow
def test_budget_fits_the_schedule_and_ends_at_its_floor(tiny_config, tmp_path, monkeypatch, capsys):
    # 10 s per step on the injected clock, a 2 min budget: after the untimed first step and the timed ones the
    # loop has used 60 s and plans 6 more steps (12 of 30); the cosine is refitted to end at step 12.
    monkeypatch.setattr(trainer_module, "StepClock", functools.partial(StepClock, clock=ticking_clock(10.0)))
    estimates = []
    model = ModSquadForMultiTask(tiny_config(TASKS))
    result = train(
        budget_recipe(tmp_path, max_minutes=2), model, colour_tasks(), on_estimate=estimates.append
    )

    assert result.step == 12 and result.out_of_time
    assert [line["step"] for line in result.history] == [5, 10, 12]
    assert result.history[-1]["lr"] == pytest.approx(1e-3 * 0.1)  # the floor, at the budget's last step
    (estimate,) = estimates
    assert estimate.step == 1 + ESTIMATE_AFTER_STEPS and estimate.planned_steps == 12
    assert estimate.seconds_per_step == 10.0 and estimate.training_seconds_left == 60.0


def test_without_a_budget_the_loop_prints_its_estimate_and_runs_every_step(
    tiny_config, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(trainer_module, "StepClock", functools.partial(StepClock, clock=ticking_clock(90.0)))
    recipe = budget_recipe(tmp_path, max_minutes=1.0, max_steps=8)
    recipe.training.max_minutes = None
    result = train(recipe, ModSquadForMultiTask(tiny_config(TASKS)), colour_tasks())
    assert result.step == 8 and not result.out_of_time
    assert "~3 min of training left (90.00 s/step, step 6 of 8)" in capsys.readouterr().out
