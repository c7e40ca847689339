"""The `modsquad` command line: a router over one module per sub-command (`modsquad.commands.<name>`, each with
`add_arguments(parser)` and `run(args)`).

Only the chosen sub-command's module is imported, and only once the command line names it, so `modsquad --help`
answers without loading torch or the model.
"""

from __future__ import annotations

import argparse
import importlib
import os
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


# Exit status of a user error (what argparse uses for a bad command line).
USER_ERROR_STATUS = 2
# Exit status of a failure of the environment (a full disk, the network, a push that failed part of the way).
FAILURE_STATUS = 1


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, except that `KEY=VALUE` recipe overrides may appear anywhere on the command line (argparse
    takes a positional list only in one piece): those it left over join `args.overrides` when the command has it."""
    args, extra = parser.parse_known_args(argv)
    overrides = [item for item in extra if is_override(item)]
    rest = [item for item in extra if not is_override(item)]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*(args.overrides or []), *overrides]
    elif overrides:
        rest = extra
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def is_override(item: str) -> bool:
    """Whether a command-line word is a `dotted.key=value` recipe override."""
    key, sep, _ = item.partition("=")
    return (
        bool(sep)
        and not item.startswith("-")
        and all(part.isidentifier() or part.isdigit() for part in key.split("."))
    )


def error_status(error: BaseException) -> int | None:
    """The exit status for an exception that is the user's or the environment's (shown as one line), or `None` for
    a bug (shown with its traceback). User errors: invalid values, missing files, unreadable recipes; failures: the
    disk, the network, a push that stopped part of the way."""
    import yaml

    if isinstance(
        error, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, yaml.YAMLError)
    ):
        return USER_ERROR_STATUS
    if isinstance(error, (OSError, ConnectionError)) or type(error).__name__ == "PushError":
        return FAILURE_STATUS
    return None


def run_reporting_errors(prog: str, run, args: argparse.Namespace) -> int:
    """Runs `run(args)`; an error that is the user's or the environment's is printed as one line `prog: error: ...`
    (set `MODSQUAD_DEBUG=1` for the traceback) with exit status 2 (user) or 1 (environment); a bug keeps its
    traceback; Ctrl-C exits with 130."""
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        status = error_status(error)
        if status is None or os.environ.get("MODSQUAD_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        return status


def exit_process(status: int) -> int:
    """`status`, or, in a process of a multi-process run, the end of the process with it: its output flushed, then
    `os._exit`, without tearing the gloo/NCCL process group down (that can deadlock; see
    `modsquad.training.trainer._LIVE_WRAPPERS`). Every file of the run is written by then."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = parse_args(build_parser(command), argv)
    import modsquad

    modsquad.register_auto_classes()  # the command line defers it (see the package docstring)
    return exit_process(
        run_reporting_errors(f"modsquad {args.command}", command_module(args.command).run, args)
    )


if __name__ == "__main__":
    sys.exit(main())
