"""Checkpoint folders of a training run: naming, listing, writing and verifying them, resolving `--resume`, keeping
the last K, guarding run folders against being mixed or replaced, and turning SIGINT/SIGTERM into a "save, then stop"
request.

A checkpoint is `<output_dir>/checkpoints/step_<NNNNNNNN>/` and holds:

- what `accelerator.save_state` writes: the model (`model.safetensors`), the optimizer (`optimizer.bin`), the
  gradient scaler under fp16 (`scaler.pt`) and every process's RNG states (`random_states_<i>.pkl`). Accelerate loads
  all of them with `torch.load(weights_only=True)`, which unpickles tensors and plain containers only, never code;
- the loop's own state, [`CheckpointedState`]: each registered object's `state_dict()` with its tensors in
  `loop_state.safetensors` and everything else in `loop_state.json`. Nothing is registered with Accelerate, whose
  `custom_checkpoint_<i>.pkl` files would be loaded with `weights_only=False` (a planted file would run code);
- `COMPLETE_MARKER`, written last (atomically): the step, the number of processes, the recipe of the run and the
  size and SHA-256 of every other file. A folder without it was cut short and is never picked as "latest".

Before anything is loaded, [`verify_checkpoint`] checks every file against the marker (missing, changed or
unexpected files are refused, naming the file and the newest intact checkpoint to resume from instead) and the
resuming recipe against the saved one (`recipe.RESUMABLE_KEYS` lists what may change).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..run_folder import (
    EMA_USAGE_FILE,
    EVAL_RESULTS_FILE,
    FINAL_DIR,
    LOGS_DIR,
    RECIPE_FILE,
    REPLICA_DIGESTS_FILE,
    SUMMARY_FILE,
    TASKS_DIR,
    TRAINING_LOG,
)
from .recipe import RESUMABLE_KEYS, recipe_changes

CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "checkpoint_complete.json"
LOOP_STATE_JSON = "loop_state.json"
LOOP_STATE_TENSORS = "loop_state.safetensors"
# Version of the checkpoint layout; checkpoints without it (pickled loop state, no checksums) are refused.
CHECKPOINT_FORMAT = 2
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What a training run writes into its folder (what `--overwrite` deletes, and what makes a folder "hold a run").
RUN_OUTPUTS = (
    RECIPE_FILE,
    TRAINING_LOG,
    CHECKPOINTS_DIR,
    FINAL_DIR,
    LOGS_DIR,
    EVAL_RESULTS_FILE,
    EMA_USAGE_FILE,
    REPLICA_DIGESTS_FILE,
    TASKS_DIR,
    SUMMARY_FILE,
)
_CHUNK = 1 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed (damaged, incomplete, foreign files, or a recipe it cannot continue);
    the message names the file and what to do instead."""


def checkpoint_path(output_dir: str | Path, step: int) -> Path:
    """Folder of the checkpoint taken after optimizer step `step`."""
    return Path(output_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run (those with a `COMPLETE_MARKER`), oldest first."""
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
    if not path.is_dir():
        raise CheckpointError(
            f"resume={resume!r}: no such checkpoint folder; pass 'latest' or one of "
            f"{[str(p) for p in list_checkpoints(output_dir)]}"
        )
    if not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(
            f"resume={resume!r} is not a complete checkpoint folder (no {COMPLETE_MARKER}: it was cut short); pass "
            f"'latest' or one of {[str(p) for p in list_checkpoints(output_dir)]}"
        )
    return path


def prune_checkpoints(output_dir: str | Path, keep_last: int) -> list[Path]:
    """Deletes all but the `keep_last` newest complete checkpoints; returns the deleted folders."""
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - keep_last)]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


# ---------------------------------------------------------------------------------------------- the loop state
class CheckpointedState:
    """The training loop's own state, saved in every checkpoint without pickle.

    Register any object with `state_dict()` and `load_state_dict(state)` under a name; its state may hold tensors,
    NumPy arrays, numbers, strings, `None`, lists, tuples and dicts. The tensors go to `loop_state.safetensors`,
    the rest to `loop_state.json`; loading rebuilds the same structure (tuples and non-string dict keys included)
    and hands it to `load_state_dict`.

    Example:

    ```python
    >>> loop_state = CheckpointedState()
    >>> loop_state.register("lr_scheduler", scheduler)
    >>> loop_state.register("mixer", mixer)
    >>> loop_state.save(folder)  # on the main process, next to accelerator.save_state(folder)
    >>> loop_state.load(folder)  # every registered object gets its state back
    ```"""

    def __init__(self):
        self._objects: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        return list(self._objects)

    def register(self, name: str, obj: Any) -> None:
        """Saves `obj.state_dict()` under `name` in every checkpoint and restores it with `obj.load_state_dict`."""
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"a checkpointed object needs a non-empty name without '/', got {name!r}")
        if name in self._objects:
            raise ValueError(f"an object is already checkpointed as {name!r}; registered: {self.names}")
        if not (
            callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))
        ):
            raise ValueError(f"{name!r}: {type(obj).__name__} has no state_dict() and load_state_dict()")
        self._objects[name] = obj

    def save(self, folder: str | Path) -> list[Path]:
        """Writes the state of every registered object into `folder`; returns the files written."""
        folder = Path(folder)
        tensors: dict[str, torch.Tensor] = {}
        skeleton = {name: _encode(obj.state_dict(), name, tensors) for name, obj in self._objects.items()}
        json_path, tensor_path = folder / LOOP_STATE_JSON, folder / LOOP_STATE_TENSORS
        save_file(tensors, str(tensor_path), metadata={"format": "modsquad-loop-state"})
        json_path.write_text(json.dumps({"format": CHECKPOINT_FORMAT, "objects": skeleton}))
        return [json_path, tensor_path]

    def load(self, folder: str | Path) -> None:
        """Restores every registered object from `folder`; raises a [`CheckpointError`] naming missing or unknown
        objects."""
        folder = Path(folder)
        json_path = folder / LOOP_STATE_JSON
        try:
            saved = json.loads(json_path.read_text())["objects"]
            tensors = load_file(str(folder / LOOP_STATE_TENSORS))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"cannot read the loop state of checkpoint {folder}: {error}") from error
        if sorted(saved) != sorted(self._objects):
            raise CheckpointError(
                f"checkpoint {folder} holds the loop state of {sorted(saved)}, this run checkpoints "
                f"{sorted(self._objects)}; it was written by a different version of the training loop"
            )
        for name, obj in self._objects.items():
            obj.load_state_dict(_decode(saved[name], tensors))


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, with its tensors moved to `tensors` under their path."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": path}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        # JSON has no NaN or infinity: keep them as tagged strings.
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {
            "__items__": [
                [_encode(k, f"{path}/key{i}", tensors), _encode(v, f"{path}/{i}", tensors)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    raise TypeError(
        f"cannot checkpoint {path}: a {type(value).__name__}; a state_dict may hold tensors, arrays, numbers, strings, "
        "None, lists, tuples and dicts"
    )


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if "__ndarray__" in value:
        return tensors[value["__ndarray__"]].numpy()
    if "__float__" in value:
        return float(value["__float__"])
    if "__tuple__" in value:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if "__items__" in value:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value["__items__"]}
    return {k: _decode(v, tensors) for k, v in value.items()}


# --------------------------------------------------------------------------------------- manifest and checks
def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: str | Path, **fields: Any) -> Path:
    """Writes `COMPLETE_MARKER` into a checkpoint folder whose files are all written: `fields` (step, recipe, ...)
    plus the size and SHA-256 of every file. Written to a temporary name and renamed, so it is never half there."""
    folder = Path(folder)
    files = {
        path.name: {"bytes": path.stat().st_size, "sha256": file_digest(path)}
        for path in sorted(folder.iterdir())
        if path.is_file() and path.name != COMPLETE_MARKER
    }
    marker = folder / COMPLETE_MARKER
    partial = folder / f".{COMPLETE_MARKER}.partial"
    partial.write_text(json.dumps({"format": CHECKPOINT_FORMAT, **fields, "files": files}, indent=1))
    os.replace(partial, marker)
    return marker


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The `COMPLETE_MARKER` of a checkpoint folder; a [`CheckpointError`] if it is missing or unreadable."""
    marker = Path(folder) / COMPLETE_MARKER
    try:
        manifest = json.loads(marker.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{marker} cannot be read ({error}); the checkpoint is damaged") from error
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != CHECKPOINT_FORMAT
        or "files" not in manifest
    ):
        raise CheckpointError(
            f"checkpoint {folder} was written by an older version of modsquad (no file checksums; its loop state is "
            "pickled, which is never loaded): it cannot be resumed safely. Start a new run (--overwrite or a new "
            "output_dir), or initialise from its weights with model.pretrained"
        )
    files = manifest["files"]
    # Only plain names of this folder: a listed "../x" would have the check read files elsewhere.
    strange = (
        [name for name in files if Path(name).name != name or name in ("", ".", "..")]
        if isinstance(files, dict)
        else [files]
    )
    if strange:
        raise CheckpointError(
            f"{marker} lists files outside its folder: {strange}; the checkpoint is damaged"
        )
    return manifest


def damaged_files(folder: str | Path, manifest: dict[str, Any] | None = None) -> list[str]:
    """What is wrong with the files of a checkpoint folder, one line per file (empty when it is intact): files
    missing, changed since they were written (size or SHA-256), or not written by the checkpoint (never loaded)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_manifest(folder)
    problems = []
    for name, expected in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path} has {path.stat().st_size} bytes, {expected['bytes']} were written")
        elif file_digest(path) != expected["sha256"]:
            problems.append(f"{path} has changed since it was written (SHA-256 differs)")
    for path in sorted(folder.iterdir()):
        if path.name == COMPLETE_MARKER or path.name.startswith(".") or path.name in manifest["files"]:
            continue
        problems.append(
            f"{path} was not written with this checkpoint (an unknown {'folder' if path.is_dir() else 'file'} is "
            "never loaded: delete it if you trust the rest of the folder)"
        )
    return problems


def newest_intact_checkpoint(output_dir: str | Path, before: Path | None = None) -> Path | None:
    """The newest complete checkpoint of a run (older than `before` when given) whose files are all intact."""
    for folder in reversed(list_checkpoints(output_dir)):
        if before is not None and _step_of(folder) >= _step_of(before):
            continue
        try:
            if not damaged_files(folder):
                return folder
        except CheckpointError:
            continue
    return None


def verify_checkpoint(
    folder: str | Path,
    num_processes: int,
    recipe: dict[str, Any] | None = None,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Checks a checkpoint before anything of it is loaded and returns its manifest.

    Refuses (with a [`CheckpointError`] naming the file, and the newest intact older checkpoint of the run to resume
    from instead) a folder with missing, changed or foreign files, one taken with another number of processes, and
    a resuming recipe that changes what the checkpoint fixes; logs the recipe changes it honours.

    Args:
        folder (`str` or `Path`): the checkpoint folder.
        num_processes (`int`): processes of the resuming run.
        recipe (`dict`, *optional*): `TrainingRecipe.to_dict()` of the resuming run.
        log (`Callable`, *optional*): where to report honoured recipe changes.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems = damaged_files(folder, manifest)
    if problems:
        run_dir = folder.parent.parent if folder.parent.name == CHECKPOINTS_DIR else None
        fallback = newest_intact_checkpoint(run_dir, before=folder) if run_dir is not None else None
        advice = (
            f"Resume from the newest intact checkpoint instead: --resume {fallback} (the steps after "
            f"{_step_of(fallback)} are trained again)"
            if fallback is not None
            else "No older intact checkpoint of this run exists; start afresh with --overwrite"
        )
        raise CheckpointError(f"checkpoint {folder} is damaged: {'; '.join(problems)}. {advice}")
    saved_processes = manifest.get("num_processes")
    if saved_processes is not None and saved_processes != num_processes:
        raise CheckpointError(
            f"checkpoint {folder} was taken by {saved_processes} processes, this run has {num_processes}: the data "
            f"shards and per-process RNG states would not match. Resume with {saved_processes} processes"
        )
    if recipe is not None and manifest.get("recipe") is not None:
        honoured, refused = recipe_changes(manifest["recipe"], recipe)
        if refused:
            raise CheckpointError(
                f"cannot resume {folder} with a changed recipe: {'; '.join(refused)}. The checkpoint's optimizer "
                "state, data order and model depend on these; resume with the values it was taken with, or start a "
                f"new run (a new output_dir, or --overwrite). What may change on resume: {list(RESUMABLE_KEYS)}"
            )
        for line in honoured:
            if not line.startswith(("resume:", "overwrite:")):
                log(f"resume: honouring the changed {line}")
    return manifest


def _step_of(folder: Path) -> int:
    match = _STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else 0


# ------------------------------------------------------------------------------------------- saving and loading
def save_checkpoint(accelerator, folder: str | Path, loop_state: CheckpointedState, **fields: Any) -> Path:
    """Writes a checkpoint on every process: Accelerate's files, the loop state (main process), then the manifest
    with `fields` and the checksums. A write that fails on any process (a full disk, a lost mount) removes the
    partial folder and raises an `OSError` naming the folder, the file and the last complete checkpoint, on every
    process (the processes agree first, so none is left waiting for the others)."""
    folder = Path(folder)
    error: BaseException | None = None
    try:
        if folder.exists() and accelerator.is_main_process:
            # A folder of this step cut short by an earlier crash: its files must not mix with the new ones.
            shutil.rmtree(folder)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(folder))
        if accelerator.is_main_process:
            loop_state.save(folder)
    except OSError as exc:
        error = exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and error is None:
        try:
            write_manifest(folder, num_processes=accelerator.num_processes, **fields)
        except OSError as exc:
            error = exc
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:
        return folder
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()
    run_dir = folder.parent.parent
    last = list_checkpoints(run_dir)
    where = f"{error.filename}: " if error is not None and getattr(error, "filename", None) else ""
    cause = f"{where}{error.strerror or error}" if error is not None else "it failed on another process"
    raise OSError(
        getattr(error, "errno", None),
        f"could not write checkpoint {folder} ({cause}); the partial folder was removed. The last complete "
        f"checkpoint is {last[-1] if last else 'none'}: free space (or fix the folder) and resume with --resume",
    ) from error


def load_checkpoint(accelerator, folder: str | Path, loop_state: CheckpointedState) -> None:
    """Loads a verified checkpoint (see [`verify_checkpoint`]): model, optimizer, scaler and RNG states through
    Accelerate (`weights_only=True` loads), the loop state from JSON / safetensors. Raises a [`CheckpointError`]
    naming the folder when something cannot be loaded, including RNG states Accelerate would skip silently."""
    folder = Path(folder)
    try:
        accelerator.load_state(str(folder))
    except Exception as error:  # any failure of a verified checkpoint is reported the same way
        raise CheckpointError(f"cannot load checkpoint {folder}: {type(error).__name__}: {error}") from error
    loop_state.load(folder)
    _check_rng_restored(folder, accelerator.process_index)


def _check_rng_restored(folder: Path, process_index: int) -> None:
    """Accelerate only logs (at info level) when it cannot restore the RNG states: a run would then resume with
    other random numbers than it was interrupted with. Compare the torch generator with the saved one."""
    from accelerate.utils import load

    path = folder / f"random_states_{process_index}.pkl"
    try:
        saved = load(path)["torch_manual_seed"]
    except Exception as error:
        raise CheckpointError(
            f"cannot read the RNG states {path}: {type(error).__name__}: {error}"
        ) from error
    if not torch.equal(saved, torch.get_rng_state()):
        raise CheckpointError(f"the RNG states of {path} were not restored; the resumed run would diverge")


# ------------------------------------------------------------------------------------------------ run folders
def run_outputs(output_dir: str | Path) -> list[Path]:
    """What an earlier run left in `output_dir` (its recipe, log, checkpoints, final model, ...)."""
    folder = Path(output_dir)
    return [folder / name for name in RUN_OUTPUTS if (folder / name).exists()]


def check_run_folder(output_dir: str | Path, resume: str | None, overwrite: bool) -> Path | None:
    """Decides how a run may start in `output_dir`; returns the checkpoint to resume from (or `None`).

    A folder holding an earlier run is refused unless the run resumes it (`resume`) or replaces it (`overwrite`):
    starting over it would mix its checkpoints and log with the new run's and replace its final model. `resume`
    without any checkpoint starts afresh only if the earlier run ended before its first checkpoint and before its
    final model. Reads only: call it on every process before anything is written.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {str(output_dir)!r} is a file, not a folder")
    earlier = run_outputs(output_dir)
    shown = ", ".join(path.name for path in earlier)
    if overwrite or not earlier:
        return resolve_resume(resume, output_dir)
    if resume is None:
        raise ValueError(
            f"output_dir {str(output_dir)!r} already holds a run ({shown}); resume it with --resume (recipe "
            "`resume: latest`), replace it with --overwrite (recipe `overwrite: true`), or pick a new output_dir"
        )
    resume_from = resolve_resume(resume, output_dir)
    if resume_from is None and (output_dir / FINAL_DIR).exists():
        raise ValueError(
            f"output_dir {str(output_dir)!r} holds a finished run without checkpoints ({shown}): there is nothing "
            "to resume and starting afresh would replace its final model; use --overwrite or a new output_dir"
        )
    own = output_dir.resolve() / CHECKPOINTS_DIR
    if resume_from is not None and resume_from.resolve().parent != own:
        raise ValueError(
            f"output_dir {str(output_dir)!r} holds another run ({shown}); resume {resume_from} into its own run "
            "folder or into an empty one"
        )
    return resume_from


def clear_run(output_dir: str | Path) -> list[Path]:
    """Deletes what an earlier run left in `output_dir` (see `RUN_OUTPUTS`; other files stay); returns it."""
    removed = run_outputs(output_dir)
    for path in removed:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


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
    "LOOP_STATE_JSON",
    "LOOP_STATE_TENSORS",
    "RUN_OUTPUTS",
    "CheckpointError",
    "CheckpointedState",
    "StopOnSignal",
    "check_run_folder",
    "checkpoint_path",
    "clear_run",
    "damaged_files",
    "file_digest",
    "list_checkpoints",
    "load_checkpoint",
    "newest_intact_checkpoint",
    "prune_checkpoints",
    "read_manifest",
    "resolve_resume",
    "run_outputs",
    "save_checkpoint",
    "verify_checkpoint",
    "write_manifest",
]
