"""The `modsquad` command line: one sub-command per module, each with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module implementing it, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "benchmark": ("modsquad.benchmark", "time MoE layers against dense MLPs of the same active size"),
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
