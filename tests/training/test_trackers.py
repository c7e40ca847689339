"""Trackers: every tracker Accelerate supports is accepted by name, the CSV tracker is one of Accelerate's registered
trackers, and a run logs to TensorBoard (installed with the package, works offline) and CSV at once."""

from __future__ import annotations

import csv

import pytest
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from torch.utils.data import DataLoader

from modsquad import ModSquadForMultiTask
from modsquad.data.mixing import subset
from modsquad.training.recipe import load_recipe
from modsquad.training.tracking import CSVTracker, trackers_to_log_with
from modsquad.training.trainer import TaskData, train

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
TASK = {"name": "cls", "type": "image-classification", "num_labels": 2}


def test_csv_is_a_registered_accelerate_tracker(tmp_path):
    assert LOGGER_TYPE_TO_CLASS["csv"] is CSVTracker
    accelerator = Accelerator(log_with="csv", project_dir=str(tmp_path), cpu=True)
    accelerator.init_trackers("run", config={"lr": 0.1})
    accelerator.log({"loss": 0.5}, step=1)
    accelerator.end_training()
    rows = list(csv.reader((tmp_path / "run" / "metrics.csv").open()))
    assert rows == [["step", "name", "value"], ["1", "loss", "0.5"]]


@pytest.mark.parametrize(
    "name", ["wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "tensorboard"]
)
def test_every_accelerate_tracker_is_a_valid_recipe_value(tmp_path, name):
    recipe = load_recipe(tasks=[{"name": "cls"}], training={"tracker": [name, "csv"]})
    assert recipe.training.tracker == [name, "csv"]


def test_tracker_errors_name_the_value_and_the_fix(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown tracker\(s\) \['wandbb'\]; accepted: \['csv', .*'wandb'"):
        load_recipe(tasks=[{"name": "cls"}], training={"tracker": "wandbb"})
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        load_recipe(tasks=[{"name": "cls"}], training={"tracker": ["none", "csv"]})
    # A tracker that is not installed fails up front (Accelerate alone would drop it silently).
    monkeypatch.setattr("modsquad.training.tracking.get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(ValueError, match=r"'wandb' needs the 'wandb' package.*pip install wandb"):
        trackers_to_log_with("wandb")
    assert trackers_to_log_with("all") == ["tensorboard", "csv"]
    assert trackers_to_log_with("none") is None


def test_a_run_logs_to_tensorboard_and_csv(tmp_path, tiny_config, bright_shapes):
    import torch

    images, shapes = bright_shapes(8, 32, torch.Generator().manual_seed(0))
    labels = (shapes.flatten(1).float().mean(1) > shapes.flatten(1).float().mean()).long()
    dataset = [{"pixel_values": image, "labels": label} for image, label in zip(images, labels)]
    task = TaskData("cls", dataset, lambda rows, epoch: DataLoader(subset(dataset, rows), batch_size=4), 4)
    recipe = load_recipe(
        tasks=[{"name": "cls"}],
        output_dir=str(tmp_path / "run"),
        training={"max_steps": 2, "log_every": 1, "eval_at_end": False, "tracker": ["tensorboard", "csv"]},
    )
    train(recipe, ModSquadForMultiTask(tiny_config([TASK])), [task])
    logs = tmp_path / "run" / "logs" / "tracker"
    assert list(logs.glob("events.out.tfevents.*"))  # TensorBoard's event file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    rows = list(csv.DictReader((logs / "metrics.csv").open()))
    assert [row["step"] for row in rows if row["name"] == "train/loss"] == ["1", "2"]
