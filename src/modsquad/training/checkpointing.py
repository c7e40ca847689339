"""Checkpoint folders of a training run: naming, listing, resolving `--resume`, keeping the last K, and turning
SIGINT/SIGTERM into a "save, then stop" request.

A checkpoint is `<output_dir>/checkpoints/step_<NNNNNNNN>/`, written by `accelerator.save_state` (model, optimizer,
scaler, RNG states of every process, registered objects: schedule, data mixer, trainer state). The file
`COMPLETE_MARKER` is written last, so a folder cut short by a crash is never picked as "latest".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from types import FrameType

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "checkpoint_complete.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after optimizer step `step`."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_DIR.match(folder.name)
        if match and (folder / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), folder))
    return [folder for _, folder in sorted(found)]


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from.

    Args:
        resume (`str`, *optional*): `None` (start fresh), `"latest"` (newest complete checkpoint of `output_dir`, or a
            fresh start when there is none yet: a requeued job can always pass it) or a checkpoint folder.
        output_dir (`str` or `Path`): the run folder.

    Returns:
        `Path` or `None`.
    """
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"resume={resume!r} is not a complete checkpoint folder (no {COMPLETE_MARKER}); pass 'latest' or one of "
            f"{[str(p) for p in list_checkpoints(output_dir)]}"
        )
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Deletes all but the `keep_last` newest complete checkpoints; returns the deleted folders."""
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - keep_last)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


class StopOnSignal:
    """Context manager: while active, SIGINT and SIGTERM only set `requested` (the loop saves and stops at the end
    of the current step); a second signal of the same kind falls through to the previous handler (a second Ctrl-C
    still kills). Handlers are installed only in the main thread, where Python allows it.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: int | None = None  # the signal number received
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested == signum:
            previous = self._previous.get(signum)
            if callable(previous):
                previous(signum, frame)
                return
            # The previous disposition was the default (terminate) or ignore: restore it and deliver again.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum

    def __enter__(self) -> StopOnSignal:
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


__all__ = [
    "CHECKPOINTS_DIR",
    "COMPLETE_MARKER",
    "StopOnSignal",
    "checkpoint_path",
    "list_checkpoints",
    "prune_checkpoints",
    "resolve_resume",
]
