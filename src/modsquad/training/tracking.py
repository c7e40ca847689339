"""A dependency-free CSV experiment tracker for Accelerate's `log_with` (next to its TensorBoard tracker)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from accelerate.tracking import GeneralTracker, on_main_process


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


__all__ = ["CSVTracker"]
