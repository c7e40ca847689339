"""Telling a local path from a Hub id in what users type, so that a missing folder is reported as a missing folder
(and not as "Repo id must be in the form 'namespace/repo_name'", which is what the Hub clients say about it)."""

from __future__ import annotations

import os

# Extensions of files users point at (data files, recipes, weights): a value ending so is a path, never a repo id.
PATH_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl", ".yaml", ".yml", ".safetensors", ".txt")


def looks_like_path(value: str) -> bool:
    """Whether `value` can only be a local path: absolute, starting with `.` or `~`, with a backslash, more than
    one `/`, a file extension, or not a valid Hub repo id at all."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value or value.count("/") > 1:
        return True
    if value.lower().endswith(PATH_EXTENSIONS):
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return False


def check_path_or_repo_id(value: str, what: str) -> str:
    """`value` if it is an existing local path or can be a Hub repo id; a ValueError saying the path does not exist
    otherwise.

    Args:
        value (`str`): what the user gave.
        what (`str`): what it names, for the message (e.g. `"checkpoint"`, `"dataset"`).
    """
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{what} must be a local path or a Hub id (namespace/name), got {value!r}")
    value = os.fspath(value)
    if os.path.exists(os.path.expanduser(value)):
        return value
    if looks_like_path(value):
        raise ValueError(
            f"{what} {value!r} does not exist (no such file or folder; a Hub id looks like 'namespace/name')"
        )
    return value


__all__ = ["PATH_EXTENSIONS", "check_path_or_repo_id", "looks_like_path"]
