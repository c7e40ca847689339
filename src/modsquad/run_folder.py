"""The layout of a training-run folder: one set of names for the trainer that writes it and for pruning, inspecting
and publishing, which read it.

A run folder holds the multi-task model (`model/`, or `final/` as [`train`] writes it: a `save_pretrained` folder
with its image processor), the pruned per-task models (`tasks/<task>/`, each with its README card), evaluation
results (`metrics.json` or the trainer's `eval_results.json`: `{task: {metric: value}}`), optionally the trainer's
`expert_usage_ema.json`, `recipe.yaml`, `training_log.jsonl`, `logs/` (trackers) and `checkpoints/`. A plain
`save_pretrained` folder is accepted as a run of its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model.configuration_modsquad import ModSquadConfig

# Written by the trainer (`training.trainer.train`).
FINAL_DIR = "final"
EVAL_RESULTS_FILE = "eval_results.json"
EMA_USAGE_FILE = "expert_usage_ema.json"
RECIPE_FILE = "recipe.yaml"
TRAINING_LOG = "training_log.jsonl"
LOGS_DIR = "logs"
REPLICA_DIGESTS_FILE = "replica_digests.json"
LOSS_WEIGHTS_FILE = "loss_weights.json"  # inside FINAL_DIR
# Written by `modsquad demo` and `modsquad prune`.
SUMMARY_FILE = "metrics.json"
TASKS_DIR = "tasks"
# Where readers look for the main model and its evaluation results, in order of preference.
MODEL_DIRS = ("model", FINAL_DIR)
METRICS_FILES = (SUMMARY_FILE, EVAL_RESULTS_FILE)
# Written next to each pruned model (and the multi-task model) by `prune_run`: what its card shows.
USAGE_FILE = "expert_usage.json"
USAGE_PLOT = "expert_usage.png"
PRUNING_FILE = "pruning.json"


def is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


@dataclass
class RunFolder:
    """The parts of a run folder (see the module docstring).

    Attributes:
        root (`Path`): the run folder (or the plain checkpoint folder).
        model_dir (`Path`): the `save_pretrained` folder of the main (usually multi-task) model.
    """

    root: Path
    model_dir: Path

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """Finds the model folder of a run folder or takes `path` as a plain checkpoint folder."""
        root = Path(path)
        if not root.is_dir():
            raise ValueError(
                f"{str(path)!r} is not a folder; expected a run folder or a save_pretrained folder"
            )
        if is_model_folder(root):
            return cls(root, root)
        for name in MODEL_DIRS:
            if is_model_folder(root / name):
                return cls(root, root / name)
        raise ValueError(
            f"{str(path)!r} is neither a save_pretrained folder (config.json) nor a run folder with one in "
            f"{' or '.join(f'{name}/' for name in MODEL_DIRS)}"
        )

    @property
    def tasks_dir(self) -> Path:
        return self.root / TASKS_DIR

    def config(self) -> ModSquadConfig:
        config = ModSquadConfig.from_pretrained(self.model_dir)
        if not isinstance(config, ModSquadConfig):
            raise ValueError(f"{self.model_dir} does not hold a ModSquad model")
        return config

    def task_dirs(self) -> dict[str, Path]:
        """Pruned models of the run, by task (folders of `tasks/` holding a config.json)."""
        if not self.tasks_dir.is_dir():
            return {}
        return {d.name: d for d in sorted(self.tasks_dir.iterdir()) if d.is_dir() and is_model_folder(d)}

    def metrics(self) -> dict[str, dict[str, float]]:
        """Evaluation results of the main model by task (`{}` when the run has none)."""
        for name in METRICS_FILES:
            path = self.root / name
            if path.is_file():
                return read_task_metrics(path)
        return {}

    def ema_usage_fractions(self) -> dict[str, list[list[float]]]:
        """The trainer's per-task EMA of expert usage: per task, one list of expert fractions per router (`{}` when
        the run has none). `pruning.usage.run_ema_usage` turns it into [`ExpertUsage`]s."""
        path = self.root / EMA_USAGE_FILE
        if not path.is_file():
            return {}
        return json.loads(path.read_text())

    def training_data(self) -> dict[str, str]:
        """Per task, what it was trained on as the recipe names it (a Hub id, a path, or `demo`)."""
        path = self.root / RECIPE_FILE
        if not path.is_file():
            return {}
        import yaml

        recipe = yaml.safe_load(path.read_text()) or {}
        found = {}
        for task in recipe.get("tasks") or []:
            if not isinstance(task, dict) or "name" not in task:
                continue
            dataset = task.get("dataset") or {}
            if dataset.get("demo"):
                found[task["name"]] = "demo"
            elif dataset.get("path"):
                found[task["name"]] = str(dataset["path"])
        return found


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a `save_pretrained` folder (one, or the shards); links that lead out of the folder
    are not the folder's (and are never read or published)."""
    root = Path(folder).resolve()
    return sorted(path for path in Path(folder).glob("*.safetensors") if path.resolve().parent == root)


def count_parameters(folder: str | Path) -> int:
    """Parameters stored in a folder's safetensors files, read from their headers (no tensor is loaded)."""
    from safetensors import safe_open

    total = 0
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def weights_bytes(folder: str | Path) -> int:
    """Size on disk of a folder's safetensors files."""
    return sum(path.stat().st_size for path in weight_files(folder))


def read_task_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from a JSON file in that form, or with it under a `"tasks"` or `"metrics"` key.
    Non-numeric and NaN entries are left out."""
    data: Any = json.loads(Path(path).read_text())
    for key in ("tasks", "metrics"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object {{task: {{metric: value}}}}, got {type(data).__name__}"
        )
    metrics = {}
    for task, values in data.items():
        if isinstance(values, dict):
            numbers = {
                k: float(v)
                for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
            }
            if numbers:
                metrics[task] = numbers
    return metrics


__all__ = [
    "EMA_USAGE_FILE",
    "EVAL_RESULTS_FILE",
    "FINAL_DIR",
    "LOGS_DIR",
    "LOSS_WEIGHTS_FILE",
    "PRUNING_FILE",
    "RECIPE_FILE",
    "REPLICA_DIGESTS_FILE",
    "SUMMARY_FILE",
    "TASKS_DIR",
    "TRAINING_LOG",
    "USAGE_FILE",
    "USAGE_PLOT",
    "RunFolder",
    "count_parameters",
    "read_task_metrics",
    "weight_files",
    "weights_bytes",
]
