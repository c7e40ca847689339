"""`modsquad prune`: cut every task (or the chosen ones) of a run's multi-task model into a standalone model and
report parameters, weight size, load time and, with validation data, the metric before and after.

Example:

```
modsquad prune runs/demo --dataset cls=data/cls --dataset seg=data/seg --split validation
modsquad prune runs/demo --task cls --threshold 0.01      # from the trainer's expert_usage_ema.json
```
"""

from __future__ import annotations

import argparse
import json

from ..data.schemas import parse_columns
from ..pruning.prune import DEFAULT_PRUNE_THRESHOLD
from ..pruning.run import calibration_loader, format_prune_table, prune_run
from ..run_folder import RunFolder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `prune` sub-command's arguments to `parser`."""
    parser.add_argument("run", help="run folder (model in model/ or final/) or a save_pretrained folder")
    parser.add_argument(
        "--task", action="append", dest="tasks", help="task to prune (repeatable; default: all)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_PRUNE_THRESHOLD,
        help="keep experts with more than this share of a router's selections (default "
        f"{DEFAULT_PRUNE_THRESHOLD}; 0 keeps every expert used, and the outputs on the calibration data)",
    )
    parser.add_argument(
        "--min-experts", type=int, help="experts kept at least per router (default: the router's top-k)"
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="[TASK=]DATASET",
        help="calibration/validation data of a task: Hub id, folder or data file in the task's column schema "
        "(repeatable; TASK= may be left out when one task is pruned). Without it, usage comes from the run's "
        "expert_usage_ema.json",
    )
    parser.add_argument("--split", default="validation", help="split to evaluate on (default: validation)")
    parser.add_argument(
        "--calibration-split", help="split whose routing decides what to keep (default: the --split)"
    )
    parser.add_argument(
        "--calibration-samples", type=int, default=256, help="calibration rows per task (default 256)"
    )
    parser.add_argument("--max-eval-samples", type=int, help="evaluate on the first N rows only")
    parser.add_argument("--no-eval", action="store_true", help="calibrate only, do not score the models")
    parser.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="TASK:ROLE=COLUMN,...",
        help="column renames of a task's dataset, e.g. cls:image=img,label=y (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--license", default="apache-2.0", help="license on the model cards (Hub license id)")
    parser.add_argument("--json", metavar="PATH", help="also write the table rows to this JSON file")


def _per_task(values: list[str], separator: str, tasks: list[str], option: str) -> dict[str, str]:
    """`TASK<sep>VALUE` strings -> {task: value}; a bare value names the only task."""
    parsed = {}
    for value in values:
        task, found, rest = value.partition(separator)
        if not found or not task.isidentifier():
            if len(tasks) != 1:
                raise ValueError(
                    f"{option} {value!r} must be TASK{separator}VALUE when several tasks are pruned"
                )
            task, rest = tasks[0], value
        if task not in tasks:
            raise ValueError(f"{option} {value!r} names task {task!r}; the tasks pruned here are {tasks}")
        parsed[task] = rest
    return parsed


def run(args: argparse.Namespace) -> int:
    """Runs `modsquad prune`; returns the exit status."""
    for name in ("calibration_samples", "batch_size", "max_eval_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    folder = RunFolder.open(args.run)
    config = folder.config()
    tasks = [config.get_task(t)["name"] for t in args.tasks] if args.tasks else list(config.task_names)
    datasets = _per_task(args.dataset, "=", tasks, "--dataset")
    columns = {t: parse_columns(c) for t, c in _per_task(args.columns, ":", tasks, "--columns").items()}

    loaders, validation, options, described = {}, {}, {}, {}
    if datasets:
        from transformers import AutoImageProcessor

        from ..data.loading import load_split

        processor = AutoImageProcessor.from_pretrained(folder.model_dir)
        for task, source in datasets.items():
            entry = config.get_task(task)
            calibration = load_split(source, split=args.calibration_split or args.split)
            rows = min(args.calibration_samples, len(calibration))
            described[task] = f"the first {rows} rows of {source} [{args.calibration_split or args.split}]"
            loaders[task] = calibration_loader(
                entry, processor, calibration, args.calibration_samples, args.batch_size, columns.get(task)
            )
            if not args.no_eval:
                validation[task] = load_split(source, split=args.split)
                options[task] = {
                    "batch_size": args.batch_size,
                    "columns": columns.get(task),
                    "max_samples": args.max_eval_samples,
                }
        missing = [t for t in tasks if t not in datasets]
        if args.tasks and missing:
            raise ValueError(f"--task {missing} have no --dataset; give one per pruned task")
        tasks = list(datasets)
    rows = prune_run(
        folder.root,
        loaders,
        args.threshold,
        # Without --dataset, prune_run prunes from the run's EMA usage: every task that has one, or those named.
        tasks=tasks if loaders or args.tasks else None,
        validation_datasets=validation,
        evaluation_options=options,
        min_experts=args.min_experts,
        license=args.license,
        calibration_data=described,
    )
    print(f"pruned {len(rows)} task(s) of {folder.model_dir} into {folder.tasks_dir}")
    print(format_prune_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


__all__ = ["add_arguments", "run"]
