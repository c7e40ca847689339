"""`modsquad push`: publish a run to the Hugging Face Hub, the multi-task model as `--repo-id` and every pruned task
model of `RUN/tasks/` as `<repo-id>-<task>`, each with its card.

Example:

```
modsquad prune runs/demo --dataset cls=data/cls ...   # writes runs/demo/tasks/<task>/
modsquad push runs/demo --repo-id my-org/modsquad-demo
```
"""

from __future__ import annotations

import argparse

from ..hub.push import push_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `push` sub-command's arguments to `parser`."""
    parser.add_argument(
        "run", help="run folder (model in model/ or final/, task models in tasks/) or a model folder"
    )
    parser.add_argument("--repo-id", required=True, help="Hub repo of the main model, as namespace/name")
    parser.add_argument(
        "--task", action="append", dest="tasks", help="push only these task models (repeatable)"
    )
    parser.add_argument("--private", action="store_true", default=None, help="create the repos private")
    parser.add_argument(
        "--token", help="Hub token (default: HF_TOKEN, or the login saved by `hf auth login`)"
    )
    parser.add_argument("--license", default="apache-2.0", help="license on the model cards (Hub license id)")
    parser.add_argument("--base-model", help="Hub id of the dense model the main model was upcycled from")
    parser.add_argument(
        "--commit-message",
        default="Upload Mod-Squad model with modsquad",
        help="commit message of the uploads",
    )
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")


def run(args: argparse.Namespace) -> int:
    """Runs `modsquad push`; returns the exit status. What each repo receives (and what is left out) is printed
    before anything is uploaded."""
    uploaded = push_run(
        args.run,
        args.repo_id,
        tasks=args.tasks,
        private=args.private,
        token=args.token,
        license=args.license,
        base_model=args.base_model,
        commit_message=args.commit_message,
        dry_run=args.dry_run,
        log=lambda line: print(line, flush=True),
    )
    if not args.dry_run:
        print(f"done: {len(uploaded)} repos published: {', '.join(uploaded)}")
    return 0


__all__ = ["add_arguments", "run"]
