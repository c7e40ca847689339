"""The `modsquad` command line: a router over one module per sub-command (`modsquad.commands.<name>`, each with
`add_arguments(parser)` and `run(args)`).

Only the chosen sub-command's module is imported, and only once the command line names it, so `modsquad --help`
answers without loading torch or the model.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> one-line help; the module is `modsquad.commands.<sub-command>`
COMMANDS: dict[str, str] = {
    "demo": "the main job on generated data: train all four tasks, evaluate, prune, plot usage",
    "train": "multi-task training from a YAML recipe (Accelerate; resumable)",
    "evaluate": "evaluate a checkpoint on a dataset split with its task's metrics",
    "prune": "cut each task of a run into a standalone model of the experts it uses",
    "inspect": "show a checkpoint's tasks, experts per layer, parameters and usage",
    "push": "publish a run (multi-task model and pruned task models) to the Hub",
    "benchmark": "time MoE layers and whole models against dense ones of the same active size; peak memory of a "
    "multi-task step; the demo under each task sampler",
}


def command_module(name: str):
    """The module implementing sub-command `name`."""
    return importlib.import_module(f"modsquad.commands.{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `modsquad` parser; the arguments of sub-command `command` (only) are filled in from its module."""
    parser = argparse.ArgumentParser(
        prog="modsquad", description="Mod-Squad multi-task MoE vision transformer."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            command_module(name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    import modsquad

    modsquad.register_auto_classes()  # the command line defers it (see the package docstring)
    return int(command_module(args.command).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
