"""Mixing several single-task datasets into multi-task training steps.

Each task keeps its own dataset, batch size and resolution. A [`TaskStream`] turns one task's dataset into an
endless sequence of batches, re-shuffled every task-epoch with a seed derived from `(seed, task, epoch)`, and sharded
across processes. A [`MultiTaskMixer`] decides which tasks one step trains on:

- `"simt"` (single iteration, multiple tasks): every step takes one micro-batch of **every** task;
- `"proportional"`: `tasks_per_step` micro-batches drawn with replacement with `p_t ∝ n_t` (dataset sizes);
- `"temperature"`: `p_t ∝ n_t ** (1 / temperature)` (1 = proportional, large = uniform);
- `"uniform"`: `p_t = 1 / num_tasks`.

The draw of step `s` depends only on `(seed, s)`, so every process draws the same tasks and a resumed run draws what
the uninterrupted run would have. The whole mixer state (step, each stream's epoch and position) is a small dict;
restoring it reproduces the data order exactly, without reading the skipped batches.

What an "epoch" means (`MultiTaskMixer.steps_per_epoch`): under `simt`, the number of steps after which the largest
task has been seen once (smaller tasks wrap around and are seen more often); under the sampling strategies, the
number of steps that draws as many micro-batches as one pass over every dataset (`sum_t batches_t /
tasks_per_step`), i.e. every dataset once in expectation under `proportional`.

Streamed datasets (`datasets.IterableDataset`) go through a [`StreamingTaskStream`] instead: shuffled with a buffer
(the same seed on every process), split across processes with `datasets.distributed.split_dataset_by_node`, and
resumed by skipping the rows already seen in the epoch. A stream does not know its length: its epoch is a declared
number of rows (`num_rows`), or the stream is endless (each process starts a new pass when its share runs out) and
a run is measured in steps only; `steps_per_epoch` is then `None`. The sampling strategies that weigh tasks by size
(`proportional`, `temperature`) need the declared length.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

# `datasets` shuffles streams with seeds below 2**32.
_STREAM_SEED_BOUND = 2**32

STRATEGIES = ("simt", "proportional", "temperature", "uniform")


def task_probabilities(sizes: Sequence[int], strategy: str, temperature: float = 2.0) -> list[float]:
    """Sampling probability of each task.

    Args:
        sizes (`Sequence[int]`): number of training samples of each task.
        strategy (`str`): one of `"simt"`, `"proportional"`, `"temperature"`, `"uniform"`. Under `"simt"` every task
            is in every step; the returned probabilities are then the uniform ones (each task's share of micro-batches).
        temperature (`float`, *optional*, defaults to 2.0): the `tau` of `p_t ∝ n_t ** (1 / tau)`; used only by
            `"temperature"`.

    Returns:
        `list[float]`: one probability per task, summing to 1.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"mixing strategy {strategy!r} is unknown; accepted: {list(STRATEGIES)}")
    if not sizes or any(int(n) < 1 for n in sizes):
        raise ValueError(f"every task needs at least one sample, got dataset sizes {list(sizes)}")
    if strategy == "temperature" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    counts = np.asarray(sizes, dtype=np.float64)
    if strategy in ("simt", "uniform"):
        weights = np.ones_like(counts)
    elif strategy == "proportional":
        weights = counts
    else:
        # In log space: sizes of millions to the power 1/tau stay finite for small tau.
        log_w = np.log(counts) / temperature
        weights = np.exp(log_w - log_w.max())
    return (weights / weights.sum()).tolist()


def subset(dataset: Any, indices: Sequence[int]) -> Any:
    """Rows `indices` of a 🤗 `datasets.Dataset` (cheap: an indices mapping) or of any map-style torch dataset; handy
    in a `make_loader` for datasets whose rows need no per-row randomness."""
    if hasattr(dataset, "select"):
        return dataset.select(list(indices))
    return Subset(dataset, list(indices))


def epoch_seed(seed: int, task_index: int, epoch: int) -> int:
    """A 63-bit seed for the random augmentations of one task-epoch (combine it with the row index per row)."""
    return int(
        np.random.SeedSequence([seed, task_index, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1)
    )


class TaskStream:
    """Endless, deterministic, sharded batches of one task.

    Every task-epoch, the dataset is permuted with a generator seeded by `(seed, task_index, epoch)`; the permutation
    is cut into global batches of `batch_size * num_replicas` samples (the last incomplete one is dropped, so every
    process always sees full batches and all processes stay in step), and process `rank` takes its `batch_size` slice
    of each. The batches are produced by `make_loader(rows, epoch)`, a function building a non-shuffling
    `DataLoader` (or any iterable of batches of `batch_size`) over the dataset rows `rows` (indices, in order): the
    stream hands it exactly the rows still to be seen in this epoch, so resuming skips ahead without loading
    anything. Random augmentations stay reproducible across a resume when they are seeded by `(epoch, row index)`,
    not by a position in the loader.

    Args:
        num_samples (`int`): number of rows of this task's training dataset.
        batch_size (`int`): batch size per process.
        make_loader (`Callable`): `(rows, epoch) -> iterable of batches`, called once per epoch (and on resume).
        seed (`int`, *optional*, defaults to 0): base seed of the shuffles.
        task_index (`int`, *optional*, defaults to 0): distinguishes the shuffles of tasks sharing a seed.
        num_replicas (`int`, *optional*, defaults to 1): number of processes the batches are split over.
        rank (`int`, *optional*, defaults to 0): this process.
        shuffle (`bool`, *optional*, defaults to `True`): permute every epoch (else keep the dataset order).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        make_loader: Callable[[list[int], int], Iterable],
        seed: int = 0,
        task_index: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        self.batch_size = batch_size
        self.make_loader = make_loader
        self.seed = seed
        self.task_index = task_index
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_samples = int(num_samples)
        global_batch = batch_size * num_replicas
        self.batches_per_epoch = self.num_samples // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"task {task_index}: {self.num_samples} samples cannot fill one global batch of {global_batch} "
                f"(batch_size={batch_size} x {num_replicas} processes); lower the batch size or add data"
            )
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._iterator: Iterator | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the dataset used in `epoch` (identical on every process)."""
        if not self.shuffle:
            return np.arange(self.num_samples)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.task_index, epoch]))
        return rng.permutation(self.num_samples)

    def rows(self, epoch: int, start_batch: int = 0) -> list[int]:
        """This process's rows of `epoch` from batch `start_batch` on, in the order they are batched."""
        order = self.epoch_order(epoch)
        global_batch = self.batch_size * self.num_replicas
        used = order[: self.batches_per_epoch * global_batch].reshape(self.batches_per_epoch, global_batch)
        mine = used[start_batch:, self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return mine.reshape(-1).tolist()

    def _open(self) -> None:
        # A DataLoader draws its workers' base seed from the global torch RNG when iterated: fork it, so that when
        # and how often loaders are (re)opened never shifts the model's random numbers (dropout, router noise).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, self.task_index, self.epoch))
            self._iterator = iter(self.make_loader(self.rows(self.epoch, self.position), self.epoch))

    def __iter__(self) -> TaskStream:
        return self

    def __next__(self) -> Any:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            self._iterator = None
        if self._iterator is None:
            self._open()
        try:
            batch = next(self._iterator)
        except StopIteration as error:
            raise RuntimeError(
                f"task {self.task_index}: the loader ended after {self.position} of {self.batches_per_epoch} batches; "
                "make_loader must not drop or merge batches (batch_size as given, drop_last only of partial batches)"
            ) from error
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"task {self.task_index}: the checkpoint was taken with {state['num_samples']} samples, "
                f"this dataset has {self.num_samples}; resuming would not reproduce the data order"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None


class StreamingTaskStream:
    """Endless, deterministic, sharded batches of one task whose dataset is streamed (`datasets.IterableDataset`).

    Every pass (epoch) shuffles the stream with a seed derived from `(seed, task_index, epoch)` (shard order and a
    buffer of `buffer_size` rows; the same on every process), then keeps this process's share with
    `datasets.distributed.split_dataset_by_node` (whole shards when their number divides the number of processes,
    else every `num_replicas`-th row). `make_loader(rows, epoch)` turns the share into batches of `batch_size`
    (keeping full batches only); `rows` yields `(key, row)` pairs, `key = (rank, position in this process's pass)`
    (what a row's augmentation should be seeded by), with rows left undecoded (`IterableDataset.decode(False)`, so
    that DataLoader workers decode them: `dataset.features.decode_example(row)`).

    An epoch is `num_rows` rows (`num_rows // (batch_size * num_replicas)` batches per process, all processes in
    step), or, without `num_rows`, one pass over this process's share (processes may then start their next passes
    at different steps; each one's position is saved, see `MultiTaskMixer.gather_stream_states`). Resuming skips the
    rows already seen in the epoch: nothing is decoded or augmented for them, so the batches that follow are exactly
    those of the uninterrupted run.

    Args:
        dataset (`datasets.IterableDataset`): the training stream.
        batch_size (`int`): batch size per process.
        make_loader (`Callable`): `(rows, epoch) -> iterable of batches`, called once per pass (and on resume).
        num_rows (`int`, *optional*): rows of one epoch; without it the stream is measured in steps only.
        seed (`int`, *optional*, defaults to 0): base seed of the shuffles.
        task_index (`int`, *optional*, defaults to 0): distinguishes the shuffles of tasks sharing a seed.
        num_replicas (`int`, *optional*, defaults to 1): number of processes the stream is split over.
        rank (`int`, *optional*, defaults to 0): this process.
        shuffle (`bool`, *optional*, defaults to `True`): shuffle every pass (else keep the stream's order).
        buffer_size (`int`, *optional*, defaults to 1000): rows of the shuffle buffer.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        make_loader: Callable[[Iterable, int], Iterable],
        num_rows: int | None = None,
        seed: int = 0,
        task_index: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1000,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must be in [0, num_replicas={num_replicas})")
        if num_rows is not None and (
            isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1
        ):
            raise ValueError(f"num_rows must be a positive int or None, got {num_rows!r}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.make_loader = make_loader
        self.num_samples = num_rows
        self.seed = seed
        self.task_index = task_index
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.buffer_size = buffer_size
        self.batches_per_epoch: int | None = None
        if num_rows is not None:
            global_batch = batch_size * num_replicas
            self.batches_per_epoch = num_rows // global_batch
            if self.batches_per_epoch == 0:
                raise ValueError(
                    f"task {task_index}: {num_rows} rows cannot fill one global batch of {global_batch} "
                    f"(batch_size={batch_size} x {num_replicas} processes); lower the batch size or add data"
                )
        self.epoch = 0
        self.position = 0  # batches of the current epoch already handed out
        self._iterator: Iterator | None = None
        self._rank_states: list[dict[str, int]] | None = None

    def epoch_rows(self, epoch: int, start_row: int = 0) -> Iterator[tuple[tuple[int, int], Any]]:
        """This process's `(key, undecoded row)` pairs of `epoch`, from its row `start_row` on."""
        from datasets.distributed import split_dataset_by_node

        rows = self.dataset
        if hasattr(rows, "decode") and getattr(rows, "features", None):
            rows = rows.decode(False)
        if self.shuffle:
            seed = epoch_seed(self.seed, self.task_index, epoch) % _STREAM_SEED_BOUND
            options = {}
            if self._shards_per_process() == 1:
                # Nothing to interleave: reading a single shard directly also spares the 5 s pause `datasets`
                # makes whenever it stops interleaving shard readers (an Arrow workaround), at every pass's end.
                options["max_buffer_input_shards"] = 1
            rows = rows.shuffle(seed=seed, buffer_size=self.buffer_size, **options)
        if self.num_replicas > 1:
            rows = split_dataset_by_node(rows, rank=self.rank, world_size=self.num_replicas)
        if start_row:
            rows = rows.skip(start_row)
        for offset, row in enumerate(rows):
            yield (self.rank, start_row + offset), row

    def _shards_per_process(self) -> int:
        shards = getattr(self.dataset, "num_shards", 1) or 1
        # split_dataset_by_node hands out whole shards when they divide evenly, else every process reads them all.
        return shards // self.num_replicas if shards % self.num_replicas == 0 else shards

    def _open(self) -> None:
        # As in TaskStream: loaders draw worker seeds from the global torch RNG; keep them out of the model's.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(self.seed, self.task_index, self.epoch))
            start = self.position * self.batch_size
            self._iterator = iter(self.make_loader(self.epoch_rows(self.epoch, start), self.epoch))

    def __iter__(self) -> StreamingTaskStream:
        return self

    def __next__(self) -> Any:
        if self.batches_per_epoch is not None and self.position >= self.batches_per_epoch:
            self._next_epoch()
        if self._iterator is None:
            self._open()
        try:
            batch = next(self._iterator)
        except StopIteration:
            if self.batches_per_epoch is not None:
                raise RuntimeError(
                    f"task {self.task_index}: process {self.rank}'s share of the stream ended after {self.position} "
                    f"of the {self.batches_per_epoch} batches an epoch of num_rows={self.num_samples} needs; "
                    "declare fewer rows, or give the stream a number of shards that splits evenly over the "
                    f"{self.num_replicas} processes"
                ) from None
            if self.position == 0:
                raise RuntimeError(
                    f"task {self.task_index}: process {self.rank}'s share of the stream holds fewer than "
                    f"batch_size={self.batch_size} rows; lower the batch size or add data"
                ) from None
            self._next_epoch()  # steps only: this process starts its next pass
            self._open()
            batch = next(self._iterator)
        self.position += 1
        self._rank_states = None  # gathered for a checkpoint of an earlier step
        return batch

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        self._iterator = None

    def gather_states(self, gather: Callable[[list], list]) -> None:
        """Collects every process's `(epoch, position)` (a collective: call it on every process), so that
        `state_dict`, saved by the main process, resumes each of them where it was."""
        self._rank_states = gather([{"epoch": self.epoch, "position": self.position}])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples,
        }
        if self.num_replicas > 1:
            state["num_replicas"] = self.num_replicas
            state["ranks"] = self._rank_states or [{"epoch": self.epoch, "position": self.position}] * (
                self.num_replicas
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"task {self.task_index}: the checkpoint was taken with num_rows={state['num_samples']}, this run "
                f"declares {self.num_samples}; resuming would not reproduce the data order"
            )
        if state.get("num_replicas", 1) != self.num_replicas:
            raise ValueError(
                f"task {self.task_index}: the checkpoint split the stream over {state.get('num_replicas', 1)} "
                f"processes, this run has {self.num_replicas}; resume with the same number of processes"
            )
        mine = state["ranks"][self.rank] if "ranks" in state else state
        self.epoch, self.position = int(mine["epoch"]), int(mine["position"])
        self._iterator = None


class MultiTaskMixer:
    """Yields, step after step, the task micro-batches of one multi-task training step.

    Args:
        streams (`dict[str, TaskStream | StreamingTaskStream]`): one stream per task, in task order.
        strategy (`str`, *optional*, defaults to `"simt"`): `"simt"`, `"proportional"`, `"temperature"` or
            `"uniform"` (see the module docstring).
        temperature (`float`, *optional*, defaults to 2.0): `tau` of the `"temperature"` strategy.
        tasks_per_step (`int`, *optional*): micro-batches drawn per step by the sampling strategies (with
            replacement); defaults to the number of tasks, so that a step costs about what a `simt` step costs.
        seed (`int`, *optional*, defaults to 0): seed of the task draws.

    Example:

    ```python
    >>> mixer = MultiTaskMixer({"cls": cls_stream, "seg": seg_stream}, strategy="simt")
    >>> for task, batch in mixer.next_step():  # [("cls", batch), ("seg", batch)]
    ...     ...
    ```"""

    def __init__(
        self,
        streams: dict[str, TaskStream],
        strategy: str = "simt",
        temperature: float = 2.0,
        tasks_per_step: int | None = None,
        seed: int = 0,
    ):
        if not streams:
            raise ValueError("MultiTaskMixer needs at least one task stream")
        self.streams = dict(streams)
        self.task_names = list(self.streams)
        self.strategy = strategy
        self.temperature = temperature
        sizes = [s.num_samples for s in self.streams.values()]
        unknown = [name for name, size in zip(self.task_names, sizes) if size is None]
        if unknown and strategy in ("proportional", "temperature"):
            raise ValueError(
                f"mixing strategy {strategy!r} weighs tasks by their number of rows, but the streamed tasks "
                f"{unknown} do not declare one (num_rows); declare it or use 'simt' or 'uniform'"
            )
        # Under simt and uniform the sizes are not used: a stream of unknown length counts as 1.
        self.probabilities = task_probabilities([size or 1 for size in sizes], strategy, temperature)
        if tasks_per_step is None:
            tasks_per_step = len(self.task_names)
        if not isinstance(tasks_per_step, int) or tasks_per_step < 1:
            raise ValueError(f"tasks_per_step must be a positive int, got {tasks_per_step!r}")
        if strategy == "simt" and tasks_per_step != len(self.task_names):
            raise ValueError(
                f"tasks_per_step={tasks_per_step} contradicts strategy='simt', which takes every one of the "
                f"{len(self.task_names)} tasks each step; leave tasks_per_step unset or pick a sampling strategy"
            )
        self.tasks_per_step = tasks_per_step
        self.seed = seed
        self.step = 0

    @property
    def steps_per_epoch(self) -> int | None:
        """Steps of one epoch (see the module docstring for the definition); `None` when a streamed task has no
        declared length (the run is then measured in steps only)."""
        batches = [s.batches_per_epoch for s in self.streams.values()]
        if any(b is None for b in batches):
            return None
        if self.strategy == "simt":
            return max(batches)
        return max(1, -(-sum(batches) // self.tasks_per_step))

    def tasks_for_step(self, step: int) -> list[str]:
        """The tasks (with repeats, in task order) of step `step`; a pure function of `(seed, step)`."""
        if self.strategy == "simt":
            return list(self.task_names)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step]))
        draws = rng.choice(len(self.task_names), size=self.tasks_per_step, p=self.probabilities)
        return [self.task_names[i] for i in sorted(draws.tolist())]

    def next_step(self) -> list[tuple[str, Any]]:
        """The `(task, batch)` micro-batches of the next step."""
        batches = [(task, next(self.streams[task])) for task in self.tasks_for_step(self.step)]
        self.step += 1
        return batches

    def gather_stream_states(self, gather: Callable[[list], list]) -> None:
        """Before a checkpoint, on every process (a collective): collects each process's position in its share of
        every streamed task, which may differ between processes, so that the checkpoint resumes all of them.

        Args:
            gather (`Callable`): all-gathers a one-element list into the list of every process's element, in rank
                order (`accelerate.utils.gather_object`).
        """
        for stream in self.streams.values():
            if isinstance(stream, StreamingTaskStream) and stream.num_replicas > 1:
                stream.gather_states(gather)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "strategy": self.strategy,
            "streams": {name: stream.state_dict() for name, stream in self.streams.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["streams"]) != set(self.streams):
            raise ValueError(
                f"the checkpoint mixes tasks {sorted(state['streams'])}, this run has {sorted(self.streams)}"
            )
        if state.get("strategy", self.strategy) != self.strategy:
            raise ValueError(
                f"the checkpoint was trained with strategy {state['strategy']!r}, this run uses {self.strategy!r}; "
                "resuming would not reproduce the data order"
            )
        self.step = int(state["step"])
        for name, stream_state in state["streams"].items():
            self.streams[name].load_state_dict(stream_state)


__all__ = [
    "STRATEGIES",
    "MultiTaskMixer",
    "StreamingTaskStream",
    "TaskStream",
    "epoch_seed",
    "subset",
    "task_probabilities",
]
