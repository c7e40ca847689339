"""`modsquad evaluate`: load a checkpoint and a dataset split, run the task's metric, print (and save) the result.

Example:

```
modsquad evaluate ./checkpoint --task seg --dataset scene_parse_150 --dataset-config scene_parsing \\
    --split validation --reduce-labels --json seg_metrics.json
modsquad evaluate ./checkpoint --task cls --dataset ./val.parquet --columns image=img,label=y
```
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor

from ..data.loading import load_split
from ..data.schemas import BBOX_FORMATS, parse_columns
from ..locations import check_path_or_repo_id
from ..metrics.evaluation import evaluate_model
from ..model.configuration_modsquad import ModSquadConfig
from ..model.modeling_heads import task_head_class


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `evaluate` sub-command's arguments to `parser`."""
    parser.add_argument(
        "checkpoint", help="model folder or Hub id (a single-task, multi-task or pruned checkpoint)"
    )
    parser.add_argument("--task", help="task name to evaluate; needed when the checkpoint has several tasks")
    parser.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset id, local folder, or data file (.parquet, .arrow, .csv, .json, .jsonl)",
    )
    parser.add_argument("--dataset-config", help="dataset configuration name (load_dataset's `name`)")
    parser.add_argument("--split", default="validation", help="split to evaluate (default: validation)")
    parser.add_argument("--data-files", nargs="+", help="data files (or globs) that make up the split")
    parser.add_argument(
        "--columns",
        type=parse_columns,
        default=None,
        help="role=column renames, e.g. image=img,label=y (roles: image, label | objects, bbox, category | "
        "annotation | depth_map)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N rows")
    parser.add_argument(
        "--threshold", type=float, default=0.0, help="detection score threshold (default 0: mAP ranks all)"
    )
    parser.add_argument(
        "--bbox-format", choices=BBOX_FORMATS, help="detection boxes of the dataset (default xywh)"
    )
    parser.add_argument(
        "--reduce-labels",
        action="store_true",
        default=None,
        help="segmentation: id 0 is 'other' (ignored) and the class ids start at 1 (scene_parse_150)",
    )
    parser.add_argument("--min-depth", type=float, help="depth: ignore reference depths below this")
    parser.add_argument("--max-depth", type=float, help="depth: ignore reference depths above this")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")


def load_for_evaluation(checkpoint: str, task: str | None, device: str | None = None):
    """Loads `(model, processor, task entry)`: the single-task model of `task` through its Auto class."""
    config = AutoConfig.from_pretrained(check_path_or_repo_id(checkpoint, "checkpoint"))
    if not isinstance(config, ModSquadConfig):
        raise ValueError(
            f"{checkpoint!r} holds a {type(config).__name__} (model_type={config.model_type!r}); "
            f"modsquad evaluate takes {ModSquadConfig.model_type!r} checkpoints"
        )
    if task is None:
        if config.num_tasks != 1:
            raise ValueError(f"{checkpoint!r} has tasks {config.task_names}; pick one with --task")
        task = config.task_names[0]
    entry = config.get_task(task)
    auto_class = getattr(transformers, task_head_class(entry["type"]).auto_class)
    model = auto_class.from_pretrained(checkpoint, task=entry["name"])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoImageProcessor.from_pretrained(checkpoint)
    return model.to(device), processor, entry


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as a two-column text table."""
    width = max([len("metric"), *map(len, metrics)])
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 8}"]
    for name, value in metrics.items():
        shown = "nan" if math.isnan(value) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs `modsquad evaluate`; returns the exit status."""
    for name in ("batch_size", "max_samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    model, processor, entry = load_for_evaluation(args.checkpoint, args.task, args.device)
    dataset = load_split(args.dataset, split=args.split, data_files=args.data_files, name=args.dataset_config)
    num_samples = len(dataset) if args.max_samples is None else min(len(dataset), args.max_samples)
    metrics = evaluate_model(
        model,
        processor,
        dataset,
        batch_size=args.batch_size,
        columns=args.columns,
        max_samples=args.max_samples,
        threshold=args.threshold,
        bbox_format=args.bbox_format,
        reduce_labels=args.reduce_labels,
        min_depth=args.min_depth,
        max_depth=args.max_depth,
    )
    print(
        f"{args.checkpoint}: task {entry['name']!r} ({entry['type']}) on {args.dataset} [{args.split}], "
        f"{num_samples} samples"
    )
    print(format_table(metrics))
    if args.json:
        report = {
            "checkpoint": args.checkpoint,
            "task": entry["name"],
            "task_type": entry["type"],
            "dataset": args.dataset,
            "split": args.split,
            "num_samples": num_samples,
            # NaN (a metric undefined on this split) is not JSON; null is.
            "metrics": {name: None if math.isnan(value) else value for name, value in metrics.items()},
        }
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


__all__ = ["add_arguments", "format_table", "load_for_evaluation", "run"]
