"""Reproducible DataLoaders of one task: rows through a [`TaskDataAdapter`], batched, in an order and with
augmentations fixed by a seed, for map-style and streaming datasets alike.

Every row's augmentation is drawn from its own `numpy` generator, seeded by `(epoch seed, row)`; the epoch seeds and
the shuffles come from one `torch.Generator` seeded with `seed`. Two loaders built with the same seed therefore give
the same batches, epoch after epoch, whatever the number of workers (for map-style datasets; a stream's rows depend
on how its shards are split over workers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from .adapter import TaskDataAdapter

# Seeds are drawn below 2**62 so that adding a worker id can never overflow an int64.
_SEED_BOUND = 2**62


class SeededSampler(Sampler[tuple[int, int]]):
    """Yields `(row index, epoch seed)` pairs: a permutation (or the identity) drawn from `generator`, and one seed
    per pass from which every row's augmentation is derived.

    Args:
        num_rows (`int`): rows of the dataset.
        shuffle (`bool`): permute the rows every pass.
        generator (`torch.Generator`): source of the permutations and seeds (Accelerate synchronises a sampler's
            `generator` across processes).
    """

    def __init__(self, num_rows: int, shuffle: bool, generator: torch.Generator):
        self.num_rows = num_rows
        self.shuffle = shuffle
        self.generator = generator

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = int(torch.randint(0, _SEED_BOUND, (1,), generator=self.generator))
        if self.shuffle:
            order = torch.randperm(self.num_rows, generator=self.generator).tolist()
        else:
            order = range(self.num_rows)
        for index in order:
            yield index, epoch_seed


class BadRowError(ValueError):
    """A dataset row that cannot be used: its stored data does not decode, or its image or annotations cannot be
    right. The message names the row."""


# Rows tried in a row before a run stops: that many bad rows in sequence mean the dataset or its options are wrong.
MAX_CONSECUTIVE_BAD_ROWS = 10


def adapt_row(
    dataset: Any, adapter: TaskDataAdapter, index: int, rng: np.random.Generator | None
) -> dict[str, Any]:
    """Row `index` of `dataset` through `adapter`; a [`BadRowError`] naming the row (and the task) when it cannot
    be read or adapted. Decoding errors (a truncated or corrupt image file) count as bad rows whatever their type;
    of the adapting, only the ValueErrors of its checks and OSErrors do (anything else is a bug, not the data's)."""
    task = adapter.task.get("name")
    try:
        row = dataset[index]
    except Exception as error:  # whatever a corrupt file makes the decoder raise
        raise BadRowError(
            f"task {task!r}: row {index} cannot be read: {type(error).__name__}: {error}"
        ) from error
    try:
        return adapter(row, rng=rng, index=index)
    except (ValueError, OSError) as error:
        message = str(error)
        where = "" if message.startswith(f"row {index}") else f"row {index}: "
        raise BadRowError(f"task {task!r}: {where}{message}") from error


class AdaptedDataset(Dataset):
    """A map-style dataset of adapted rows, indexed by the `(row index, epoch seed)` pairs of [`SeededSampler`]
    (a bare row index adapts with the adapter's own generator).

    Args:
        dataset: the rows (map-style).
        adapter ([`TaskDataAdapter`]): turns rows into samples.
        skip_bad_rows (`bool`, *optional*, defaults to `False`): replace a row that raises a [`BadRowError`] by the
            next good row (deterministically: the same on every pass and after a resume) and list the skipped rows
            under the sample's `"skipped_rows"` (`[(row, reason), ...]`, which the batch carries on); after
            `MAX_CONSECUTIVE_BAD_ROWS` bad rows in sequence, raise. When `False`, the first bad row raises.
    """

    def __init__(self, dataset: Any, adapter: TaskDataAdapter, skip_bad_rows: bool = False):
        self.dataset = dataset
        self.adapter = adapter
        self.skip_bad_rows = skip_bad_rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch_seed = key if isinstance(key, tuple) else (key, None)
        skipped: list[tuple[int, str]] = []
        attempts = min(MAX_CONSECUTIVE_BAD_ROWS, len(self)) if self.skip_bad_rows else 1
        for offset in range(attempts):
            row = (index + offset) % len(self)
            rng = np.random.default_rng([epoch_seed, row]) if epoch_seed is not None else None
            try:
                sample = adapt_row(self.dataset, self.adapter, row, rng)
            except BadRowError as error:
                if not self.skip_bad_rows:
                    raise
                skipped.append((row, str(error)))
                continue
            if skipped:
                sample["skipped_rows"] = skipped
            return sample
        raise BadRowError(
            f"{len(skipped)} bad rows in a row ({', '.join(str(r) for r, _ in skipped)}): the dataset or its options "
            f"(columns, bbox_format, labels, depth_scale, ...) are wrong, not a row. First: {skipped[0][1]}"
        )


class AdaptedStreamRows(Dataset):
    """Adapts the rows of a stream handed to a DataLoader as `(undecoded row, epoch seed, key)` "indices" by its
    sampler (see `StreamingTaskStream`): the main process only reads the stream, in order; DataLoader workers decode
    each row with the stream's `features` and augment it with a generator seeded by `(epoch seed, *key)`, so the
    batches are the same for any number of workers and after a resume."""

    def __init__(self, features: Any, adapter: TaskDataAdapter):
        self.features = features
        self.adapter = adapter

    def __getitem__(self, item: tuple[dict[str, Any], int, tuple[int, ...]]) -> dict[str, Any]:
        row, epoch_seed, key = item
        if self.features is not None:
            row = self.features.decode_example(row)
        return self.adapter(row, rng=np.random.default_rng([epoch_seed, *key]))


class AdaptedIterableDataset(IterableDataset):
    """A stream of adapted rows. Each pass (each DataLoader iteration) gets a seed: from the DataLoader's worker
    seed in workers (shared by all workers of a pass, so they shuffle the shards alike), else from `generator`."""

    def __init__(self, dataset: Any, adapter: TaskDataAdapter, shuffle: bool, seed: int, buffer_size: int):
        self.dataset = dataset
        self.adapter = adapter
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is None:
            pass_seed, worker = int(torch.randint(0, _SEED_BOUND, (1,), generator=self.generator)), 0
        else:
            # Workers get `base_seed + worker_id`, base_seed drawn from the DataLoader's generator per pass.
            pass_seed, worker = info.seed - info.id, info.id
        rows = self.dataset
        if self.shuffle:
            # `datasets` shuffles the shard order and a buffer of rows; its seed must fit 32 bits.
            rows = rows.shuffle(seed=pass_seed % 2**32, buffer_size=self.buffer_size)
        for count, row in enumerate(rows):
            try:
                yield self.adapter(row, rng=np.random.default_rng([pass_seed, worker, count]), index=count)
            except (ValueError, OSError) as error:
                # A stream has no row index: `count` is the item's position in this worker's pass.
                raise BadRowError(
                    f"task {self.adapter.task.get('name')!r}, worker {worker} of the stream, in this pass's order: "
                    f"{error}"
                ) from error


def build_task_dataloader(
    dataset: Any,
    adapter: TaskDataAdapter,
    batch_size: int,
    shuffle: bool = True,
    seed: int | None = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    *,
    buffer_size: int = 1000,
    **dataloader_kwargs,
) -> DataLoader:
    """A DataLoader of model-ready batches of one task.

    Args:
        dataset: a map-style dataset of rows (`datasets.Dataset`, or any `__len__` / `__getitem__` dataset of row
            dicts) or a `datasets.IterableDataset` (streaming).
        adapter ([`TaskDataAdapter`]): turns rows into samples; its `collate` makes the batches.
        batch_size (`int`): samples per batch.
        shuffle (`bool`, *optional*, defaults to `True`): a new permutation every pass (streams: shard order plus
            a buffer of `buffer_size` rows).
        seed (`int`, *optional*, defaults to 0): seed of the order and the augmentations; `None` draws it from
            torch's global generator (so `torch.manual_seed` fixes it).
        num_workers (`int`, *optional*, defaults to 0): worker processes. A stream is split over workers by
            shards: give it at least `num_workers` shards.
        drop_last (`bool`, *optional*, defaults to `True`): drop the last incomplete batch.
        buffer_size (`int`, *optional*, defaults to 1000): shuffle buffer of streams.
        **dataloader_kwargs: passed to `torch.utils.data.DataLoader` (`pin_memory`, `prefetch_factor`, ...).

    Returns:
        `torch.utils.data.DataLoader` of `{"pixel_values": (batch_size, 3, H, W), "labels": ...}` (see
        [`collate_task_samples`]).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if seed is None:
        seed = int(torch.randint(0, _SEED_BOUND, (1,)))
    elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    if not isinstance(adapter, TaskDataAdapter):
        raise ValueError(f"adapter must be a TaskDataAdapter, got {type(adapter).__name__}")
    generator = torch.Generator().manual_seed(seed)
    common = {
        "batch_size": batch_size,
        "collate_fn": adapter.collate,
        "drop_last": drop_last,
        "num_workers": num_workers,
        "generator": generator,
        **dataloader_kwargs,
    }
    if _is_stream(dataset):
        if shuffle and not hasattr(dataset, "shuffle"):
            raise ValueError(
                f"shuffle=True needs a datasets.IterableDataset (it shuffles with a buffer); got "
                f"{type(dataset).__name__}: shuffle it yourself and pass shuffle=False"
            )
        stream = AdaptedIterableDataset(dataset, adapter, shuffle, seed, buffer_size)
        return DataLoader(stream, **common)
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ValueError(
            f"dataset must be a map-style dataset (with __len__ and __getitem__) or a datasets.IterableDataset, "
            f"got {type(dataset).__name__}"
        )
    sampler = SeededSampler(len(dataset), shuffle, generator)
    return DataLoader(AdaptedDataset(dataset, adapter), sampler=sampler, **common)


def _is_stream(dataset: Any) -> bool:
    return isinstance(dataset, (datasets.IterableDataset, IterableDataset))


__all__ = [
    "MAX_CONSECUTIVE_BAD_ROWS",
    "AdaptedDataset",
    "AdaptedIterableDataset",
    "AdaptedStreamRows",
    "BadRowError",
    "SeededSampler",
    "adapt_row",
    "build_task_dataloader",
]
