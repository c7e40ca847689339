"""Loading a dataset named the way a user types it: a Hub id, a local folder or a local data file.

`load_task_dataset` is what training uses (any split or all of them, map-style or streaming); `load_split` is what
evaluation uses (one map-style split). Rows become model samples in `adapter`, batches in `batching`; the package
`modsquad.data` exports the names users need from all of them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Any

import datasets

from ..locations import check_path_or_repo_id

# File extension -> the `datasets` packaged builder that reads it.
FILE_BUILDERS = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
}


def load_split(
    dataset: str,
    split: str = "validation",
    data_files: Sequence[str] | None = None,
    name: str | None = None,
) -> datasets.Dataset:
    """One split of a dataset.

    Args:
        dataset (`str`): a Hub id (`"scene_parse_150"`), a packaged builder (`"parquet"`, `"imagefolder"`, ...) used
            with `data_files`, a folder (one saved with `Dataset.save_to_disk`, or one holding data files whose names
            tell their split, e.g. `validation-00000.parquet`), or a single data file (`.parquet`, `.arrow`, `.csv`,
            `.json`, `.jsonl`) which is then taken as `split`.
        split (`str`, *optional*, defaults to `"validation"`): the split to return.
        data_files (`Sequence[str]`, *optional*): files (or globs) that make up `split`.
        name (`str`, *optional*): the dataset configuration (`load_dataset`'s `name`).

    Returns:
        `datasets.Dataset`
    """
    check_path_or_repo_id(dataset, "dataset")
    if os.path.isfile(dataset):
        extension = os.path.splitext(dataset)[1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(
                f"cannot read {dataset!r}: unknown data file extension {extension!r}; accepted: {sorted(FILE_BUILDERS)}"
                " (or pass a folder or a Hub dataset id)"
            )
        if data_files:
            raise ValueError(
                f"--dataset is already a data file ({dataset!r}); do not pass data_files as well"
            )
        return datasets.load_dataset(FILE_BUILDERS[extension], data_files={split: dataset}, split=split)
    if os.path.isdir(dataset) and _is_saved_to_disk(dataset):
        loaded = datasets.load_from_disk(dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(
                    f"{dataset!r} has splits {list(loaded)}, not {split!r}; pick one with split="
                )
            return loaded[split]
        return loaded
    files = {split: list(data_files)} if data_files else None
    return datasets.load_dataset(dataset, name=name, data_files=files, split=split)


def load_task_dataset(
    path_or_id: str | os.PathLike | None = None,
    split: str | None = None,
    data_files: str | Sequence[str] | dict | None = None,
    streaming: bool = False,
    **kwargs,
) -> datasets.Dataset | datasets.IterableDataset | datasets.DatasetDict | datasets.IterableDatasetDict:
    """A task's dataset, map-style or streaming, with its image columns decoded as `datasets.Image`.

    Args:
        path_or_id (`str` or `os.PathLike`): where the data is:

            - a Hub id or a packaged builder (`"imagefolder"`, `"parquet"` with `data_files`), passed to
              `datasets.load_dataset`;
            - a single data file (`.parquet`, `.arrow`, `.csv`, `.json`, `.jsonl`): that file is the split `split`
              (returned as a `Dataset`) or, without `split`, the `"train"` split of a `DatasetDict`;
            - a folder holding Parquet files (e.g. `train.parquet`, `validation-00000-of-00002.parquet`): read with
              the `parquet` builder, the split of each file told by its name;
            - a folder written by `save_to_disk`;
            - any other folder (an image folder, a dataset repository clone), passed to `datasets.load_dataset`.

            `path=` is accepted too, as `datasets.load_dataset` names it (training recipes use it).
        split (`str`, *optional*): the split to return; all splits (a `DatasetDict`) when not given.
        data_files (`str`, `Sequence[str]` or `dict`, *optional*): passed to `load_dataset` (relative to the folder
            for a folder of Parquet files).
        streaming (`bool`, *optional*, defaults to `False`): return an `IterableDataset` that reads as it goes.
        **kwargs: passed to `datasets.load_dataset` (`name`, `revision`, `cache_dir`, ...).

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset` (a `...Dict` of them when `split` is not given). Columns
        stored as `{bytes, path}` structs (Parquet written by plain pyarrow) are cast to `datasets.Image()`.

    Example:

    ```python
    >>> train = load_task_dataset("runs/demo_data/seg", split="train")
    >>> stream = load_task_dataset("scene_parse_150", split="train", streaming=True)
    ```"""
    if path_or_id is None:
        path_or_id = kwargs.pop("path", None)
    elif "path" in kwargs:
        raise ValueError(f"give the dataset once: path_or_id={path_or_id!r} and path={kwargs['path']!r}")
    if not isinstance(path_or_id, (str, os.PathLike)) or not os.fspath(path_or_id):
        raise ValueError(
            f"path_or_id must be a Hub dataset id, a local folder or a data file path, got {path_or_id!r}"
        )
    path = os.fspath(path_or_id)
    check_path_or_repo_id(path, "dataset")
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(
                f"cannot read {path!r}: unknown data file extension {extension!r}; accepted: {sorted(FILE_BUILDERS)}"
            )
        if data_files:
            raise ValueError(
                f"{path!r} is already a data file; do not pass data_files={data_files!r} as well"
            )
        dataset = datasets.load_dataset(
            FILE_BUILDERS[extension],
            data_files={split or "train": path},
            split=split,
            streaming=streaming,
            **kwargs,
        )
    elif os.path.isdir(path) and _is_saved_to_disk(path):
        dataset = _from_disk(path, split, streaming)
    elif os.path.isdir(path) and glob.glob(
        os.path.join(glob.escape(path), "**", "*.parquet"), recursive=True
    ):
        dataset = datasets.load_dataset(
            "parquet", data_dir=path, data_files=data_files, split=split, streaming=streaming, **kwargs
        )
    else:
        dataset = datasets.load_dataset(
            path, data_files=data_files, split=split, streaming=streaming, **kwargs
        )
    return cast_image_columns(dataset)


def cast_image_columns(dataset: Any) -> Any:
    """Casts every column stored as a `{bytes, path}` struct (how images look in Parquet written without the
    `datasets` features, e.g. by plain pyarrow) to `datasets.Image()`, so rows decode to PIL images."""
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        return type(dataset)({name: cast_image_columns(split) for name, split in dataset.items()})
    features = dataset.features
    if features is None:  # a stream whose features are only known once read
        return dataset
    for name, feature in features.items():
        if isinstance(feature, dict) and set(feature) == {"bytes", "path"}:
            dataset = dataset.cast_column(name, datasets.Image())
    return dataset


def _from_disk(folder: str, split: str | None, streaming: bool):
    loaded = datasets.load_from_disk(folder)
    if split is not None and isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{folder!r} has splits {list(loaded)}, not {split!r}; pick one with split=")
        loaded = loaded[split]
    if not streaming:
        return loaded
    if isinstance(loaded, datasets.DatasetDict):
        return datasets.IterableDatasetDict({name: d.to_iterable_dataset() for name, d in loaded.items()})
    return loaded.to_iterable_dataset()


def _is_saved_to_disk(folder: str) -> bool:
    # save_to_disk writes dataset_dict.json (several splits) or state.json (one split) beside the Arrow files.
    return any(os.path.isfile(os.path.join(folder, marker)) for marker in ("dataset_dict.json", "state.json"))


__all__ = [
    "FILE_BUILDERS",
    "cast_image_columns",
    "load_split",
    "load_task_dataset",
]
