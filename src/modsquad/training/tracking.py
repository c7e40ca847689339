"""Experiment trackers: every tracker Accelerate supports, plus a dependency-free CSV tracker registered with
Accelerate's tracker registry, so that `log_with=["csv", "wandb", ...]` names them all alike.

`training.tracker` in a recipe is one name or a list of names: `"csv"` (the default), any of Accelerate's
(`"tensorboard"`, `"wandb"`, `"trackio"`, `"mlflow"`, `"comet_ml"`, `"aim"`, `"clearml"`, `"dvclive"`,
`"swanlab"`), `"all"` (every one installed, CSV included) or `"none"`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from accelerate.tracking import (
    LOGGER_TYPE_TO_CLASS,
    GeneralTracker,
    get_available_trackers,
    on_main_process,
    register_tracker_class,
)
from accelerate.utils import LoggerType

# What a recipe may name besides the trackers themselves.
ALL_TRACKERS = "all"
NO_TRACKER = "none"
# Accelerate's built-in trackers (by their `log_with` names) and the package each needs.
ACCELERATE_TRACKERS = tuple(t.value for t in LoggerType if t is not LoggerType.ALL)
TRACKER_PACKAGES = {"comet_ml": "comet-ml", "tensorboard": "tensorboard"}


class CSVTracker(GeneralTracker):
    """Appends every logged scalar as a `step,name,value` row to `<logging_dir>/<run_name>/metrics.csv`.

    The long format accepts metrics that appear later (evaluation) without rewriting the header, and reads straight
    into pandas (`pd.read_csv(path).pivot(index="step", columns="name", values="value")`). Hyper-parameters go to
    `hparams.json`.

    Args:
        run_name (`str`): sub-folder of the run.
        logging_dir (`str` or `os.PathLike`): parent folder.
    """

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.folder = Path(logging_dir) / run_name
        self.path = self.folder / "metrics.csv"

    @property
    def tracker(self) -> Path:
        return self.path

    @on_main_process
    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with self.path.open("w", newline="") as handle:
                csv.writer(handle).writerow(["step", "name", "value"])

    @on_main_process
    def store_init_configuration(self, values: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "hparams.json").write_text(json.dumps(values, indent=2, default=str))

    @on_main_process
    def drop_after(self, step: int) -> None:
        """Forgets rows logged after `step` (a resumed run logs those steps again)."""
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            rows = list(csv.reader(handle))
        kept = [rows[0]] + [row for row in rows[1:] if row[0] == "" or int(row[0]) <= step]
        with self.path.open("w", newline="") as handle:
            csv.writer(handle).writerows(kept)

    @on_main_process
    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            for name, value in values.items():
                if isinstance(value, (int, float)):
                    writer.writerow([step, name, value])


def register_csv_tracker() -> None:
    """Registers [`CSVTracker`] with Accelerate as `"csv"` (once; Accelerate warns when a name is registered
    again)."""
    if LOGGER_TYPE_TO_CLASS.get(CSVTracker.name) is not CSVTracker:
        register_tracker_class(CSVTracker)


register_csv_tracker()

# Every name a recipe's `training.tracker` accepts.
TRACKER_NAMES = (CSVTracker.name, *ACCELERATE_TRACKERS, ALL_TRACKERS, NO_TRACKER)


def check_tracker_names(tracker: str | Sequence[str], where: str = "training.tracker") -> list[str]:
    """`tracker` (a name or a list of names) as a list, or a ValueError naming the unknown ones and the accepted."""
    names = (
        [tracker]
        if isinstance(tracker, str)
        else list(tracker)
        if isinstance(tracker, (list, tuple))
        else None
    )
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{where} must be a tracker name or a list of them, got {tracker!r}")
    unknown = [name for name in names if name not in TRACKER_NAMES]
    if unknown:
        raise ValueError(f"{where}: unknown tracker(s) {unknown}; accepted: {list(TRACKER_NAMES)}")
    if NO_TRACKER in names and len(names) > 1:
        raise ValueError(f"{where}={names}: 'none' cannot be combined with trackers")
    return names


def trackers_to_log_with(tracker: str | Sequence[str]) -> list[str] | None:
    """Accelerate's `log_with` for a recipe's `training.tracker`: `None` for `"none"`, every available tracker and
    CSV for `"all"`, else the names, each checked to be installed (Accelerate would silently drop a missing one).

    Raises:
        ValueError: for an unknown name, or a tracker whose package is not installed (with the package to install).
    """
    names = check_tracker_names(tracker)
    if names == [NO_TRACKER]:
        return None
    available = [str(t) for t in get_available_trackers()]
    resolved: list[str] = []
    for name in names:
        if name == ALL_TRACKERS:
            resolved += [*available, CSVTracker.name]
            continue
        if name in ACCELERATE_TRACKERS and name not in available:
            package = TRACKER_PACKAGES.get(name, name)
            raise ValueError(
                f"training.tracker {name!r} needs the {package!r} package, which is not installed: "
                f"pip install {package} (installed trackers: {[*available, CSVTracker.name]})"
            )
        resolved.append(name)
    return list(dict.fromkeys(resolved))


__all__ = [
    "ACCELERATE_TRACKERS",
    "TRACKER_NAMES",
    "CSVTracker",
    "check_tracker_names",
    "register_csv_tracker",
    "trackers_to_log_with",
]
