"""Pruning a whole run: every task's standalone model, checked against the full one, saved with its card.

[`prune_run`] is what `modsquad prune` and the demo call. For each task it collects expert usage on calibration
data (or takes given usage, e.g. the trainer's EMA), prunes, measures the pruned model against the full one on the
calibration data, saves it to `RUN/tasks/<task>/` with the image processor, `expert_usage.json`, the usage heat-map
and a README card, and reports parameters, weight size and load time before and after (and the metric change when
validation data is given). The table goes to `RUN/pruning.json`; the multi-task card is refreshed too.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..hub.model_card import DEFAULT_LICENSE, experts_kept_text, save_example_image, write_run_cards
from ..model.modeling_heads import task_head_class
from ..model.modeling_multitask import ModSquadForMultiTask
from ..run_folder import EMA_USAGE_FILE, PRUNING_FILE, USAGE_FILE, USAGE_PLOT, RunFolder, weights_bytes
from .heatmap import plot_router_usage, usage_data_text
from .prune import (
    compare_pruned_outputs,
    kept_experts_per_router,
    prune_for_task,
)
from .usage import ExpertUsage, collect_expert_usage, run_ema_usage

PROCESSOR_FILE = "preprocessor_config.json"


def _timed_load(model_class: type, folder: Path, **kwargs: Any) -> tuple[torch.nn.Module, float]:
    start = time.perf_counter()
    model = model_class.from_pretrained(folder, **kwargs)
    return model.eval(), time.perf_counter() - start


def _evaluate(
    model: torch.nn.Module, processor: Any, dataset: Any, options: Mapping[str, Any]
) -> dict[str, float]:
    from ..metrics.evaluation import evaluate_model

    return evaluate_model(model, processor, dataset, **dict(options))


def _headline_metric(task_type: str, metrics: Mapping[str, float]) -> str | None:
    """The task type's headline metric when it was computed, else the first metric."""
    headline = task_head_class(task_type).metrics[0]
    return headline if headline in metrics else next(iter(metrics), None)


def first_image(dataset: Any, task_type: str, columns: Mapping[str, str] | None = None) -> Any | None:
    """The image of the first row of a dataset in a task's Hub schema (None for an empty dataset)."""
    from ..data.schemas import task_schema

    batch = next(iter(dataset.iter(batch_size=1)), None)
    return None if batch is None else task_schema(task_type, columns).images(batch)[0]


def calibration_loader(
    entry: Mapping[str, Any],
    processor: Any,
    dataset: Any,
    samples: int = 256,
    batch_size: int = 8,
    columns: Mapping[str, str] | None = None,
    schema_options: Mapping[str, Any] | None = None,
) -> Iterable:
    """Batches of the first `samples` rows of `dataset` (a task's Hub schema), resized and normalised by
    `processor` without augmentation: the calibration data [`prune_run`] collects usage on and checks against.

    Args:
        entry (`Mapping`): the task's entry in the model config (`config.get_task(name)`).
        processor ([`ModSquadImageProcessor`]): the model's image processor.
        dataset (`datasets.Dataset`): rows in the task's column schema.
        samples (`int`, *optional*, defaults to 256): rows used at most.
        batch_size (`int`, *optional*, defaults to 8): images per batch.
        columns (`Mapping[str, str]`, *optional*): column renames, as for [`TaskDataAdapter`].
        schema_options (`Mapping`, *optional*): how to read the columns (`bbox_format`, `reduce_labels`, ...), as
            for [`TaskDataAdapter`].
    """
    from ..data.adapter import TaskDataAdapter
    from ..data.batching import build_task_dataloader

    dataset = dataset.select(range(min(samples, len(dataset))))
    adapter = TaskDataAdapter(
        dict(entry), processor, train=False, columns=columns, schema_options=dict(schema_options or {})
    )
    return build_task_dataloader(dataset, adapter, batch_size, shuffle=False, drop_last=False)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [row for row in json.loads(path.read_text()) if isinstance(row, dict) and "task" in row]


def prune_run(
    run_dir: str | Path,
    calibration_loaders: Mapping[str, Iterable] | None = None,
    threshold: float = 0.0,
    *,
    tasks: Sequence[str] | None = None,
    usages: Mapping[str, ExpertUsage] | None = None,
    validation_datasets: Mapping[str, Any] | None = None,
    evaluation_options: Mapping[str, Mapping[str, Any]] | None = None,
    max_calibration_batches: int | None = None,
    min_experts: int | None = None,
    license: str = DEFAULT_LICENSE,
    calibration_data: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Prunes every task of a run's multi-task model into `RUN/tasks/<task>/` and reports what it gained.

    Args:
        run_dir (`str` or `Path`): a run folder (model in `model/` or `final/`) or a `save_pretrained` folder.
        calibration_loaders (`Mapping[str, Iterable]`, *optional*): per task, the data whose routing decides what
            to keep (batches as [`collect_expert_usage`] takes them); the pruned model is checked against the full
            one on the same data (`max_abs_diff`).
        threshold (`float`, *optional*, defaults to 0.0): see [`prune_for_task`]; 0 keeps every expert the task
            chose on the calibration data, which keeps the outputs on that data unchanged.
        tasks (`Sequence[str]`, *optional*): tasks to prune; defaults to those with calibration data or usage, or
            to every task when the run has the trainer's `expert_usage_ema.json`.
        usages (`Mapping[str, ExpertUsage]`, *optional*): usage to prune from instead of collecting it.
        validation_datasets (`Mapping[str, Any]`, *optional*): per task, a dataset in the task's Hub schema;
            `evaluate_model` then scores the full and the pruned model on it, and its first image becomes the
            example of the cards' inference widget.
        evaluation_options (`Mapping[str, Mapping]`, *optional*): per task, extra `evaluate_model` arguments
            (`columns`, `max_samples`, `batch_size`, ...).
        max_calibration_batches (`int`, *optional*): use at most this many calibration batches per task.
        min_experts (`int`, *optional*): see [`prune_for_task`].
        license (`str`, *optional*, defaults to `"apache-2.0"`): license written on the cards.
        calibration_data (`Mapping[str, str]`, *optional*): per task, what its calibration data is (e.g. `"the
            first 128 training images"`), for the heat-maps' titles; by default told from the usage itself.

    Returns:
        `list[dict]`: one row per pruned task with `task`, `type`, `folder`, `experts_mlp` / `experts_attention`
        (kept per block), `experts_text`, `params_before` / `params_after`, `bytes_before` / `bytes_after`,
        `load_s_before` / `load_s_after` (the single-task model loaded from the multi-task folder vs the pruned
        folder), `max_abs_diff` and `routing_agreement` on the calibration data (None without it), and with
        validation data `metric`, `metric_before`, `metric_after`, `metrics_before`, `metrics_after`.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be a float in [0, 1), got {threshold!r}")
    run = RunFolder.open(run_dir)
    calibration_loaders = dict(calibration_loaders or {})
    usages = dict(usages or {})
    validation_datasets = dict(validation_datasets or {})
    evaluation_options = dict(evaluation_options or {})
    # Loading the full model first also warms up the imports, so that the load times below compare fairly.
    full = ModSquadForMultiTask.from_pretrained(run.model_dir).eval()
    config = full.config
    # The one place that falls back to the trainer's EMA usage: for tasks given neither calibration data nor usage.
    if tasks is None:
        tasks = list(dict.fromkeys([*calibration_loaders, *usages]))
    names = [config.get_task(t)["name"] for t in tasks]
    uncovered = [t for t in (names or config.task_names) if t not in calibration_loaders and t not in usages]
    if uncovered:
        ema = run_ema_usage(run, config)
        usages.update({t: ema[t] for t in uncovered if t in ema})
        if not names:
            names = [t for t in config.task_names if t in ema]
    if not names:
        raise ValueError(
            f"nothing to prune from: pass calibration data (or usages) per task; {run.root} has no "
            f"{EMA_USAGE_FILE} either"
        )
    for name in names:
        if name not in calibration_loaders and name not in usages:
            raise ValueError(
                f"task {name!r} has neither calibration data nor usage, and {run.root} has no {EMA_USAGE_FILE} "
                f"entry for it; given: {sorted({**calibration_loaders, **usages})}"
            )
    unknown = sorted(set(validation_datasets) - set(names))
    if unknown:
        raise ValueError(f"validation_datasets has tasks {unknown} that are not pruned here ({names})")

    processor = None
    if (run.model_dir / PROCESSOR_FILE).is_file():
        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(run.model_dir)
    if validation_datasets and processor is None:
        raise ValueError(f"evaluating needs the image processor, but {run.model_dir} has no {PROCESSOR_FILE}")

    rows, collected = [], []
    described = dict(calibration_data or {})
    tasks_bar = tqdm(names, desc="prune", unit="task")
    for name in tasks_bar:
        tasks_bar.set_postfix(task=name)
        entry = config.get_task(name)
        model_class = task_head_class(entry["type"]).model_class
        before, load_before = _timed_load(model_class, run.model_dir, task=name)
        loader = calibration_loaders.get(name)
        usage = usages.get(name) or collect_expert_usage(
            full, loader, name, max_batches=max_calibration_batches
        )
        collected.append(usage)
        pruned = prune_for_task(full, name, usage, threshold=threshold, min_experts=min_experts).eval()
        check = {"max_abs_diff": None, "routing_agreement": None}
        if loader is not None:
            check = compare_pruned_outputs(full, pruned, loader, max_batches=max_calibration_batches)

        folder = run.tasks_dir / name
        if folder.exists():
            shutil.rmtree(folder)  # a previous pruning of this task: replaced whole, no stale files
        pruned.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        (folder / USAGE_FILE).write_text(json.dumps(usage.to_dict()))
        plot_router_usage(
            usage,
            folder / USAGE_PLOT,
            kept=kept_experts_per_router(pruned.config),
            title=f"{name}: experts kept, usage on {usage_data_text(usage, described.get(name))}",
        )
        after, load_after = _timed_load(model_class, folder)

        row: dict[str, Any] = {
            "task": name,
            "type": entry["type"],
            "folder": str(folder.relative_to(run.root)),
            "threshold": threshold,
            "usage_source": usage.source,
            "calibration_tokens": usage.tokens,
            "experts_mlp": [len(k) for k in pruned.config.pruned_experts],
            "experts_attention": [len(k) for k in pruned.config.pruned_attention_experts]
            if pruned.config.pruned_attention_experts is not None
            else None,
            "experts_text": experts_kept_text(pruned.config),
            "params_before": before.num_parameters(),
            "params_after": after.num_parameters(),
            "bytes_before": weights_bytes(run.model_dir),
            "bytes_after": weights_bytes(folder),
            "load_s_before": load_before,
            "load_s_after": load_after,
            **check,
        }
        if name in validation_datasets:
            options = evaluation_options.get(name, {})
            example = first_image(validation_datasets[name], entry["type"], options.get("columns"))
            if example is not None:
                # The cards' widget example: this task's own data, for the pruned model and (first task) the parent.
                save_example_image(folder, example)
                if name == config.task_names[0]:
                    save_example_image(run.model_dir, example)
            row["metrics_before"] = _evaluate(before, processor, validation_datasets[name], options)
            row["metrics_after"] = _evaluate(after, processor, validation_datasets[name], options)
            row["metric"] = _headline_metric(entry["type"], row["metrics_before"])
            row["metric_before"] = row["metrics_before"].get(row["metric"])
            row["metric_after"] = row["metrics_after"].get(row["metric"])
        rows.append(row)
        del before, after, pruned

    # The multi-task card shows every task's usage that is known, this call's replacing older ones.
    usage_path = run.model_dir / USAGE_FILE
    known = {}
    if usage_path.is_file():
        known = {u["task"]: u for u in json.loads(usage_path.read_text())}
    known.update({u.task: u.to_dict() for u in collected})
    ordered = [known[t] for t in config.task_names if t in known]
    usage_path.write_text(json.dumps(ordered))
    usages = [ExpertUsage.from_dict(u) for u in ordered]
    sources = {usage_data_text(u, described.get(u.task)) for u in usages}
    # One description when every task's usage comes from the same kind of data, else each panel's own.
    title = (
        f"expert usage on {sources.pop()}" if len(sources) == 1 else "expert usage (per task: see its card)"
    )
    plot_router_usage(usages, run.model_dir / USAGE_PLOT, title=title)

    table = {row["task"]: row for row in _read_rows(run.root / PRUNING_FILE)}
    table.update({row["task"]: row for row in rows})
    (run.root / PRUNING_FILE).write_text(json.dumps(list(table.values()), indent=2))
    write_run_cards(run, license=license)
    return rows


def format_prune_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of [`prune_run`] as a text table."""

    def number(value: Any, spec: str) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, spec)

    header = ["task", "experts kept", "params", "weights MB", "load s", "max |diff|", "metric"]
    lines = [header]
    for row in rows:
        metric = "-"
        if row.get("metric") is not None:
            metric = f"{row['metric']} {number(row.get('metric_before'), '.4f')} -> {number(row.get('metric_after'), '.4f')}"
        lines.append(
            [
                row["task"],
                row.get("experts_text", "-"),
                f"{number(row.get('params_before'), ',')} -> {number(row.get('params_after'), ',')}",
                f"{number((row.get('bytes_before') or 0) / 2**20, '.2f')} -> "
                f"{number((row.get('bytes_after') or 0) / 2**20, '.2f')}",
                f"{number(row.get('load_s_before'), '.2f')} -> {number(row.get('load_s_after'), '.2f')}",
                number(row.get("max_abs_diff"), ".1e"),
                metric,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(text)


__all__ = ["calibration_loader", "first_image", "format_prune_table", "prune_run"]
