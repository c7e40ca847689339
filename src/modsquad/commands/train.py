"""`modsquad train`: multi-task training from a YAML recipe, with `dotted.key=value` overrides.

Single process: `modsquad train --config training/configs/demo.yaml training.max_steps=100`.
Several processes: `accelerate launch --multi_gpu --num_processes 2 training/train.py --config ...` (same arguments;
on a machine without GPUs this starts two CPU processes joined by gloo, whereas `--cpu --num_processes 2` starts
only one), or `accelerate launch --config_file training/accelerate/cpu_2proc.yaml training/train.py ...`.
Single-task baseline of the same active size: `--only-task seg model.config.moe_layers=[]` (dense MLPs as wide as
the active experts; from a dense checkpoint, the pretrained ViT itself). Start from a pretrained dense ViT / DeiT /
DINOv2 with `model.pretrained=facebook/dinov2-small` (or a folder): it is upcycled, and the image processors take
its mean, std and resolution (see training/configs/real_from_dense.yaml). Resume after an interruption
(SIGINT/SIGTERM save a checkpoint first): add `--resume` (newest checkpoint of the run folder) or
`--resume path/to/checkpoints/step_00000200`; a folder holding an earlier run is refused unless `--resume` or
`--overwrite` is given. An interrupted run exits with `128 + signal`; a user error prints one line and exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..training.checkpointing import check_run_folder
from ..training.recipe import TrainingRecipe, load_recipe
from ..training.starting_point import resolve_starting_point
from ..training.task_data import build_model, build_task_data
from ..training.trainer import TrainResult, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (see training/configs/)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="recipe overrides, e.g. training.max_steps=50 tasks.cls.batch_size=16 optimization.learning_rate=3e-4",
    )
    parser.add_argument("--output-dir", help="run folder (overrides output_dir of the recipe)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        action=ResumeAction,
        help="resume from a checkpoint folder, or from the newest one of the run folder when no path is given",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an output folder that holds an earlier run, deleting its checkpoints, logs and final "
        "model (recipe: overwrite: true); without it (or --resume) such a folder is refused",
    )
    parser.add_argument("--max-steps", type=int, help="optimizer steps (overrides training.max_steps)")
    parser.add_argument(
        "--max-minutes",
        type=float,
        help="wall-clock budget of training (overrides training.max_minutes): the schedule is fitted to the steps "
        "that fit, training stops at the budget, and the run is finished as usual (evaluation, final model)",
    )
    parser.add_argument("--seed", type=int, help="overrides the recipe's seed")
    parser.add_argument(
        "--only-task",
        action="append",
        metavar="NAME",
        help="train only this task of the recipe (repeatable): single-task baselines with the same recipe",
    )


class ResumeAction(argparse.Action):
    """`--resume [PATH]`: a following `KEY=VALUE` word is a recipe override, not the checkpoint path (argparse would
    take it as the optional value)."""

    def __call__(self, parser, namespace, value, option_string=None):
        from ..cli import is_override

        if value is not None and is_override(value) and not os.path.exists(value):
            namespace.resume_overrides = [*getattr(namespace, "resume_overrides", []), value]
            value = self.const
        setattr(namespace, self.dest, self.const if value is None else value)


def recipe_from_args(args: argparse.Namespace):
    """The recipe of `args.config` with the command-line options and overrides applied."""
    overrides = [*(args.overrides or []), *getattr(args, "resume_overrides", [])]
    if args.output_dir is not None:
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.max_minutes is not None:
        overrides.append(f"training.max_minutes={args.max_minutes}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.resume is not None:
        overrides.append(f"resume={json.dumps(args.resume)}")
    if args.overwrite:
        overrides.append("overwrite=true")
    recipe = load_recipe(args.config, overrides)
    if args.only_task:
        unknown = sorted(set(args.only_task) - set(recipe.task_names))
        if unknown:
            raise ValueError(
                f"--only-task {unknown}: not tasks of the recipe; its tasks are {recipe.task_names}"
            )
        recipe.tasks = [task for task in recipe.tasks if task.name in args.only_task]
    return recipe


def train_recipe(recipe: TrainingRecipe) -> TrainResult:
    """Builds the recipe's data and model, then trains: what `modsquad train` and `training/train.py` run.

    The run folder and the model's starting point (a dense or ModSquad checkpoint, or none) are checked first, so a
    folder holding another run or a bad `model.pretrained` fails before any data is loaded."""
    check_run_folder(recipe.output_dir, recipe.resume, recipe.overwrite)  # the trainer checks again
    start = resolve_starting_point(recipe)
    tasks, processor = build_task_data(recipe, start=start)
    model = build_model(recipe, tasks, start=start)
    return train(recipe, model, tasks, processor)


def run(args: argparse.Namespace) -> int:
    result = train_recipe(recipe_from_args(args))
    if result.interrupted is not None:
        print(
            f"interrupted at step {result.step}/{result.max_steps}; resume with --resume ({result.checkpoint})"
        )
        return 128 + max(result.interrupted, 0)
    if result.out_of_time:
        print(f"training was cut short at the time budget: {result.step} of {result.max_steps} steps")
    if result.metrics:
        print(json.dumps(result.metrics, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `training/train.py` (what `accelerate launch` runs): the arguments and error reporting of
    `modsquad train`."""
    from ..cli import exit_process, parse_args, run_reporting_errors

    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parse_args(parser, list(sys.argv[1:] if argv is None else argv))
    return exit_process(run_reporting_errors("train.py", run, args))


__all__ = ["add_arguments", "main", "recipe_from_args", "run", "train_recipe"]
