"""The `modsquad` sub-commands: one module each, with `add_arguments(parser)` and `run(args)`; `modsquad.cli` imports
only the one a command line names."""
