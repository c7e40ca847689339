"""`modsquad demo`: the main job, end to end on generated data, in minutes on a laptop CPU.

Generates the synthetic "shapes scenes" benchmark (four tasks, four datasets: classification, detection,
segmentation, depth), trains one multi-task MoE model on all of them with SIMT mixing (every step a batch of every
task, one mutual-information loss over them), evaluates every task with its metric next to a trivial baseline,
plots which experts each task uses, and prunes every task into a small standalone model. The run folder (default
`runs/demo-<timestamp>`) holds:

- `final/`: the trained model and its image processor (`from_pretrained`-ready);
- `metrics.json`: per-task metrics and baselines (also printed as a table), the steps trained of those planned
  (`--max-minutes` may cut training short), the time estimate printed after the first steps and the time each
  phase took; `eval_results.json`: every metric;
- `expert_usage/layer<i>_<mlp|attention>.png` and `expert_usage/fractions.json`: task-by-expert usage on
  validation data;
- `training_log.jsonl`, `logs/`: the loss curve (per task, MI loss, learning rate) and tracker files;
- `recipe.yaml`: the exact recipe, re-runnable with `modsquad train --config`;
- `tasks/<task>/`: every task pruned to the experts it uses (standalone `ModSquadFor<Type>` with its processor,
  usage heat-map and model card), checked against the full model; `pruning.json` holds the comparison (metric,
  parameters, weight size, load time, largest output difference), also printed as a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..model.modeling_heads import task_head_class
from ..pruning.heatmap import plot_expert_usage
from ..pruning.prune import DEFAULT_PRUNE_THRESHOLD
from ..pruning.run import calibration_loader, format_prune_table, prune_run
from ..pruning.usage import collect_expert_usage, router_layout
from ..run_folder import RunFolder
from ..training.budget import TimeEstimate, format_minutes
from ..training.checkpointing import check_run_folder
from ..training.recipe import load_recipe
from ..training.task_data import build_model, build_task_data
from ..training.trainer import train

# The demo recipe (training/configs/demo.yaml is the same recipe, as a file; a test keeps them equal). Sized for
# ~6 minutes on 2 CPU cores (under 8): 64px images, 8px patches, a 6-block ViT whose odd blocks are MoE
# (8 experts, top-2).
# Pruning at the end calibrates on each task's first training images.
DEMO_CALIBRATION_IMAGES = 128
# What metrics.json keeps of each pruning row (the full rows are in pruning.json).
PRUNING_SUMMARY_KEYS = (
    "task", "folder", "threshold", "experts_text", "metric", "metric_before", "metric_after", "params_before",
    "params_after", "bytes_before", "bytes_after", "max_abs_diff", "routing_agreement",
)  # fmt: skip
DEMO_DATA = {"demo": True, "num_train": 512, "num_val": 128, "image_size": 64, "seed": 0}
DEMO_RECIPE: dict[str, Any] = {
    "output_dir": "runs/demo",
    "seed": 0,
    "model": {
        "config": {
            "hidden_size": 128,
            "num_hidden_layers": 6,
            "num_attention_heads": 4,
            "patch_size": 8,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "expert_intermediate_size": 128,
            "moe_layers": "every_other",
            "mi_loss_coef": 0.01,
            "z_loss_coef": 0.001,
            "router_noise_std": 0.1,
        }
    },
    "tasks": [
        # Mean-pooled patch tokens: from scratch on 512 images, a [CLS] readout learns the shapes far more slowly
        # (accuracy 0.383 against 0.500 after 400 steps, 128 validation images).
        {
            "name": "cls",
            "dataset": dict(DEMO_DATA),
            "batch_size": 32,
            "image_size": 64,
            "head": {"pooling": "mean"},
        },
        {
            "name": "det",
            "dataset": dict(DEMO_DATA),
            "batch_size": 16,
            "image_size": 64,
            "head": {"head_channels": 64},
        },
        {
            "name": "seg",
            "dataset": dict(DEMO_DATA),
            "batch_size": 16,
            "image_size": 64,
            "head": {"decoder_channels": 32},
        },
        {
            "name": "depth",
            "dataset": dict(DEMO_DATA),
            "batch_size": 16,
            "image_size": 64,
            "head": {"decoder_channels": 32},
        },
    ],
    "mixing": {"strategy": "simt"},
    "optimization": {
        "learning_rate": 2e-3,
        "weight_decay": 0.05,
        "warmup_steps": 30,
        "min_lr_ratio": 0.05,
        "max_grad_norm": 1.0,
        "loss_weighting": "fixed",
    },
    "training": {
        "max_steps": 800,
        "log_every": 10,
        "eval_every": 0,
        "save_every": 0,
        "tracker": "csv",
    },
}


def demo_recipe(
    output_dir: str | Path,
    num_train: int | None = None,
    num_val: int | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    max_minutes: float | None = None,
):
    """The demo's [`TrainingRecipe`], with its data size, length, seed and training time budget optionally
    changed."""
    raw = copy.deepcopy(DEMO_RECIPE)
    raw["output_dir"] = str(output_dir)
    for task in raw["tasks"]:
        if num_train is not None:
            task["dataset"]["num_train"] = num_train
            # Tiny budgets: a batch must fit into the data.
            task["batch_size"] = min(task["batch_size"], num_train)
        if num_val is not None:
            task["dataset"]["num_val"] = num_val
    if max_steps is not None:
        raw["training"]["max_steps"] = max_steps
        raw["optimization"]["warmup_steps"] = min(raw["optimization"]["warmup_steps"], max_steps // 10)
    if seed is not None:
        raw["seed"] = seed
    if max_minutes is not None:
        raw["training"]["max_minutes"] = max_minutes
    return load_recipe(overrides=overrides, **raw)


def router_names(config) -> list[str]:
    """Names of the routers in the order of `router_probs`: per MoE block, attention router (if any) then MLP's."""
    return [f"layer{slot.block}_{slot.kind}" for slot in router_layout(config)]


def validation_expert_usage(model, tasks, batch_size: int = 32) -> list[np.ndarray]:
    """Per router, the `(num_tasks, num_experts)` fraction of each task's token slots routed to each expert, on
    each task's evaluation data (plain resize, no augmentation); rows of tasks without such data are zeros."""
    config = model.config
    tables: list[np.ndarray] | None = None
    for task in tqdm(tasks, desc="expert usage", unit="task"):
        if task.eval_dataset is None:
            continue
        loader = calibration_loader(
            config.get_task(task.name),
            task.processor,
            task.eval_dataset,
            samples=len(task.eval_dataset),
            batch_size=batch_size,
            columns=task.eval_columns,
            schema_options=task.eval_options,
        )
        usage = collect_expert_usage(model, loader, task.name)
        if tables is None:
            tables = [np.zeros((config.num_tasks, router.counts.numel())) for router in usage.routers]
        for table, router in zip(tables, usage.routers):
            table[config.task_index(task.name)] = router.fractions.numpy()
    return tables or []


def validation_usage_title(router: str, tasks) -> str:
    """The title of the demo's heat-map of `router`, saying which data it counts: the validation split (the cards'
    maps count the calibration images pruning used, so the two differ)."""
    sizes = {task.name: len(task.eval_dataset) for task in tasks if task.eval_dataset is not None}
    if len(set(sizes.values())) == 1:
        counted = f"{next(iter(sizes.values()))} images per task"
    else:
        counted = ", ".join(f"{name}: {size}" for name, size in sizes.items())
    return f"expert usage, {router}, on the validation split ({counted})"


def trivial_baselines(datasets: dict, tasks) -> dict[str, float]:
    """What a model that ignores the image scores on each demo task's validation split, per headline metric:
    majority class (classification), all-majority-class maps (segmentation mIoU), no boxes (detection), the
    training median depth everywhere (depth delta1)."""
    baselines: dict[str, float] = {}
    for task in tasks:
        splits = datasets[task.name]
        val = splits["validation"]
        if task.name == "cls":
            labels = np.asarray(val["label"])
            train_majority = np.bincount(np.asarray(splits["train"]["label"])).argmax()
            baselines[task.name] = float((labels == train_majority).mean())
        elif task.name == "seg":
            maps = [np.asarray(m) for m in val["annotation"]]
            majority = np.bincount(np.concatenate([m.ravel() for m in maps])).argmax()
            present = sorted({int(v) for m in maps for v in np.unique(m)})
            # Predicting `majority` everywhere: IoU = its pixel share for that class, 0 for the others present.
            share = np.mean(np.concatenate([(m == majority).ravel() for m in maps]))
            baselines[task.name] = float(share / len(present))
        elif task.name == "det":
            baselines[task.name] = 0.0
        elif task.name == "depth":
            train_depth = np.concatenate(
                [np.asarray(d, dtype=np.float32).ravel() for d in splits["train"]["depth_map"]]
            )
            constant = float(np.median(train_depth[train_depth > 0]))
            depth = np.concatenate([np.asarray(d, dtype=np.float32).ravel() for d in val["depth_map"]])
            depth = depth[depth > 0]
            ratio = np.maximum(depth / constant, constant / depth)
            baselines[task.name] = float((ratio < 1.25).mean())
    return baselines


def prune_every_task(run_dir: Path, tasks, threshold: float) -> list[dict]:
    """Prunes every demo task into `RUN/tasks/<task>/` (with its card), calibrating on the first
    `DEMO_CALIBRATION_IMAGES` training images of the task, and scores the full and the pruned model on the task's
    validation split. Returns the rows of [`prune_run`]."""
    from transformers import AutoImageProcessor

    run = RunFolder.open(run_dir)
    config = run.config()
    processor = AutoImageProcessor.from_pretrained(run.model_dir)
    loaders, validation, options = {}, {}, {}
    for task in tasks:
        loaders[task.name] = calibration_loader(
            config.get_task(task.name),
            processor,
            task.train_dataset,
            samples=DEMO_CALIBRATION_IMAGES,
            batch_size=task.eval_batch_size,
            columns=task.eval_columns,
            schema_options=task.eval_options,
        )
        if task.eval_dataset is not None:
            validation[task.name] = task.eval_dataset
            options[task.name] = task.evaluation_kwargs()
    calibration = {task.name: f"the first {DEMO_CALIBRATION_IMAGES} training images" for task in tasks}
    return prune_run(
        run.root,
        loaders,
        threshold,
        validation_datasets=validation,
        evaluation_options=options,
        calibration_data=calibration,
    )


# The demo's work after training, counted in image forwards for its time estimate: the final evaluation and the
# expert-usage maps read every validation image once; pruning reads the calibration images three times (usage, then
# the full and the pruned model's outputs compared) and the validation images twice (full and pruned model scored).
VALIDATION_PASSES_AFTER_TRAINING = 4
CALIBRATION_PASSES = 3
# A training image costs a forward and a backward of about twice the forward's cost.
FORWARDS_PER_TRAINING_IMAGE = 3.0
# Per task, what does not scale with images: saving, loading and re-loading the pruned model, its plots and card.
SECONDS_PER_TASK_AFTER_TRAINING = 4.0


def after_training_seconds(tasks, seconds_per_step: float) -> float:
    """Estimated wall time of the demo after its training steps (evaluation, expert-usage maps, pruning), from
    the measured time of a training step: the images each phase reads, at the per-image forward cost a training
    step shows, plus a fixed cost per task.

    Args:
        tasks (`list[TaskData]`): the demo's task data (SIMT: every task's batch in every step).
        seconds_per_step (`float`): measured wall time of one training step.
    """
    images_per_step = sum(task.batch_size for task in tasks)
    forward_seconds = seconds_per_step / (images_per_step * FORWARDS_PER_TRAINING_IMAGE)
    forwards = 0
    for task in tasks:
        num_val = len(task.eval_dataset) if task.eval_dataset is not None else 0
        calibration = min(DEMO_CALIBRATION_IMAGES, len(task.train_dataset))
        forwards += VALIDATION_PASSES_AFTER_TRAINING * num_val + CALIBRATION_PASSES * calibration
    return forwards * forward_seconds + SECONDS_PER_TASK_AFTER_TRAINING * len(tasks)


class JobEstimate:
    """Prints, once the training loop has timed its first steps, how long the whole demo has left, and keeps what
    it printed for `metrics.json` (to compare with the time the phases really took)."""

    def __init__(self, tasks, started: float):
        self.tasks = tasks
        self.started = started
        self.summary: dict[str, Any] | None = None

    def __call__(self, estimate: TimeEstimate) -> None:
        after = after_training_seconds(self.tasks, estimate.seconds_per_step)
        left = estimate.training_seconds_left + after
        budget = ""
        if estimate.planned_steps < estimate.max_steps:
            budget = f"; the {estimate.budget_seconds / 60:g} min budget fits {estimate.planned_steps} of "
            budget += f"{estimate.max_steps} steps"
        tqdm.write(
            f"~{format_minutes(left)} left: training ~{format_minutes(estimate.training_seconds_left)} "
            f"({estimate.seconds_per_step:.2f} s/step), then evaluation, expert maps and pruning "
            f"~{format_minutes(after)}{budget}"
        )
        self.summary = {
            "at_step": estimate.step,
            "elapsed_seconds": round(time.perf_counter() - self.started, 1),
            "seconds_per_step": round(estimate.seconds_per_step, 3),
            "planned_steps": estimate.planned_steps,
            "training_seconds_left": round(estimate.training_seconds_left, 1),
            "after_training_seconds": round(after, 1),
            "total_seconds": round(time.perf_counter() - self.started + left, 1),
        }


def headline_metric(task_type: str) -> str:
    """The metric a task type is judged by in the demo's tables (its head's first metric)."""
    return task_head_class(task_type).metrics[0]


def metrics_table(metrics: dict[str, dict[str, float]], task_types: dict[str, str], baselines: dict) -> str:
    """A plain-text table: task, metric, value, trivial baseline."""
    lines = [f"{'task':<8}{'metric':<12}{'value':>10}{'baseline':>10}"]
    for task, values in metrics.items():
        name = headline_metric(task_types[task])
        baseline = baselines.get(task)
        shown = f"{baseline:>10.3f}" if baseline is not None else f"{'':>10}"
        lines.append(f"{task:<8}{name:<12}{values.get(name, float('nan')):>10.3f}{shown}")
        second = task_head_class(task_types[task]).metrics[1]
        if second in values:
            lines.append(f"{'':<8}{second:<12}{values[second]:>10.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", help="run folder (default: runs/demo-<timestamp>)")
    parser.add_argument(
        "--max-steps", type=int, help=f"optimizer steps (default {DEMO_RECIPE['training']['max_steps']})"
    )
    parser.add_argument(
        "--num-train", type=int, help=f"training images per task (default {DEMO_DATA['num_train']})"
    )
    parser.add_argument(
        "--num-val", type=int, help=f"validation images per task (default {DEMO_DATA['num_val']})"
    )
    parser.add_argument("--seed", type=int, help="seed of the data, the model and the training")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="time budget of training, in minutes: the learning-rate schedule is fitted to the steps that fit, "
        "training stops at the budget, then evaluation, expert maps and pruning run as usual (metrics.json "
        "records the steps done of those planned)",
    )
    parser.add_argument(
        "--prune-threshold",
        type=float,
        default=DEFAULT_PRUNE_THRESHOLD,
        help="keep, per task and router, the experts with more than this share of the task's selections on its "
        f"calibration images (default {DEFAULT_PRUNE_THRESHOLD}; 0 keeps every expert the task used)",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as for `modsquad train`"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --output-dir (otherwise such a folder is refused)",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output_dir = Path(args.output_dir or f"runs/demo-{datetime.now():%Y%m%d-%H%M%S}")
    overrides = [*(args.overrides or []), *(["overwrite=true"] if args.overwrite else [])]
    recipe = demo_recipe(
        output_dir, args.num_train, args.num_val, args.max_steps, args.seed, overrides, args.max_minutes
    )
    # Refuse a folder holding another run before the data is generated (the trainer checks again).
    check_run_folder(recipe.output_dir, recipe.resume, recipe.overwrite)
    print(f"modsquad demo -> {output_dir}")
    tasks, processor = build_task_data(recipe)
    generated = time.perf_counter()
    model = build_model(recipe, tasks)
    job_estimate = JobEstimate(tasks, started)
    result = train(recipe, model, tasks, processor, on_estimate=job_estimate)
    if result.interrupted is not None:
        print(f"interrupted at step {result.step}; checkpoint {result.checkpoint}")
        return 128 + max(result.interrupted, 0)
    trained = time.perf_counter()

    model = result.model
    task_types = {task["name"]: task["type"] for task in model.config.tasks}
    demo_sets = {task.name: {"train": task.train_dataset, "validation": task.eval_dataset} for task in tasks}
    baselines = trivial_baselines(demo_sets, tasks)
    usage = validation_expert_usage(model, tasks)
    usage_dir = output_dir / "expert_usage"
    names = router_names(model.config)
    for name, table in zip(names, usage):
        plot_expert_usage(
            table,
            model.config.task_names,
            usage_dir / f"{name}.png",
            title=validation_usage_title(name, tasks),
        )
    (usage_dir / "fractions.json").write_text(
        json.dumps({name: table.tolist() for name, table in zip(names, usage)}, indent=1)
    )
    mapped = time.perf_counter()
    pruning_rows = prune_every_task(output_dir, tasks, args.prune_threshold)
    finished = time.perf_counter()
    summary = {
        "metrics": result.metrics,
        "headline": {
            task: {headline_metric(task_types[task]): values.get(headline_metric(task_types[task]))}
            for task, values in result.metrics.items()
        },
        "baselines": baselines,
        "pruning": [{key: row.get(key) for key in PRUNING_SUMMARY_KEYS} for row in pruning_rows],
        "steps": result.step,
        "planned_steps": result.max_steps,
        "training_cut_short": result.out_of_time,
        "max_minutes": recipe.training.max_minutes,
        "estimate": job_estimate.summary,
        "seconds": {
            "data": round(generated - started, 1),
            "training_and_evaluation": round(trained - generated, 1),
            "usage_maps": round(mapped - trained, 1),
            "pruning": round(finished - mapped, 1),
            "total": round(finished - started, 1),
        },
    }
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    if result.out_of_time:
        print(
            f"training was cut short at the {recipe.training.max_minutes:g} min budget: {result.step} of "
            f"{result.max_steps} steps (metrics below are of the shorter run)"
        )
    print(metrics_table(result.metrics, task_types, baselines))
    print(f"\npruned task models (threshold {args.prune_threshold}) in {output_dir / 'tasks'}:")
    print(format_prune_table(pruning_rows))
    print(
        f"done in {summary['seconds']['total']:.0f} s; model in {result.final_dir}, heat-maps in {usage_dir}"
    )
    return 0


__all__ = [
    "DEMO_RECIPE",
    "JobEstimate",
    "after_training_seconds",
    "demo_recipe",
    "metrics_table",
    "router_names",
    "trivial_baselines",
    "validation_expert_usage",
    "validation_usage_title",
]
