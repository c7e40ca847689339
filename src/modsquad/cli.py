"""The `modsquad` command line: one sub-command per module, each with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "benchmark": ("modsquad.benchmark", "time MoE layers against dense MLPs of the same active size"),
    "evaluate": ("modsquad.evaluate_cli", "evaluate a checkpoint on a dataset split with its task's metrics"),
    "train": ("modsquad.train_cli", "multi-task training from a YAML recipe (Accelerate; resumable)"),
    "demo": ("modsquad.demo", "the main job on generated data: train all four tasks, evaluate, plot usage"),
    "prune": ("modsquad.prune_cli", "cut each task of a run into a standalone model of the experts it uses"),
    "inspect": ("modsquad.inspect_cli", "show a checkpoint's tasks, experts per layer, parameters and usage"),
    "push": ("modsquad.push_cli", "publish a run (multi-task model and pruned task models) to the Hub"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="modsquad", description="Mod-Squad multi-task MoE vision transformer."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
