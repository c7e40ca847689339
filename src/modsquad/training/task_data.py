"""From a training recipe to what the training loop is handed: each task's data as a [`TaskData`] (its splits loaded
or the demo benchmark generated, its labels read, its rows wrapped in a `TaskDataAdapter`) and the multi-task model
over all task entries. Built above the loop, as in Accelerate's examples: `train(recipe, model, tasks, processor)`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import datasets
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from ..data.adapter import TaskDataAdapter
from ..data.batching import AdaptedDataset, AdaptedStreamRows
from ..data.demo import demo_task_configs, make_demo_datasets
from ..data.loading import load_task_dataset
from ..data.mixing import epoch_seed
from ..locations import check_path_or_repo_id
from ..model.configuration_modsquad import LABELLED_TASK_TYPES, TASK_TYPES, ModSquadConfig
from ..model.image_processing_modsquad import ModSquadImageProcessor
from ..model.modeling_multitask import ModSquadForMultiTask
from .recipe import TaskRecipe, TrainingRecipe
from .starting_point import StartingPoint, resolve_starting_point


@dataclass
class TaskData:
    r"""
    The data of one task, ready for training.

    Args:
        name (`str`): task name (as in the model config).
        train_dataset: map-style training dataset, or a streamed one (`datasets.IterableDataset`).
        make_loader (`Callable`): `(rows, epoch) -> iterable of batches`. Map-style: over the row indices `rows` of
            `train_dataset`, in that order (a non-shuffling DataLoader of `batch_size` that keeps every row; see
            [`TaskStream`]). Streamed: over the `(key, undecoded row)` pairs `rows` yields, full batches only (see
            [`StreamingTaskStream`]). Batches are dicts with `pixel_values` and `labels`.
        batch_size (`int`): training batch size per process.
        eval_dataset (*optional*): evaluation dataset in its Hub schema (what `evaluate_model` reads).
        processor (*optional*): the image processor that evaluation uses for this task.
        eval_columns (`dict`, *optional*): column renames for `evaluate_model`.
        eval_options (`dict`, *optional*): more keyword arguments of `evaluate_model` (`bbox_format`,
            `reduce_labels`, `threshold`, ...).
        eval_batch_size (`int`, *optional*, defaults to 8): evaluation batch size.
        max_eval_samples (`int`, *optional*): evaluate on the first rows only.
        loss_weight (`float`, *optional*, defaults to 1.0): fixed task weight.
        config_entry (`dict`, *optional*): the task's entry of `ModSquadConfig.tasks` (to build a model from).
        num_train_rows (`int`, *optional*): rows of one epoch of a streamed `train_dataset` (unknown: endless).
    """

    name: str
    train_dataset: Any
    make_loader: Callable[[list[int], int], Iterable]
    batch_size: int
    eval_dataset: Any | None = None
    processor: Any | None = None
    eval_columns: dict[str, str] | None = None
    eval_options: dict[str, Any] = field(default_factory=dict)
    eval_batch_size: int = 8
    max_eval_samples: int | None = None
    loss_weight: float = 1.0
    config_entry: dict[str, Any] | None = None
    num_train_rows: int | None = None

    @property
    def is_streamed(self) -> bool:
        """Whether the training data is a stream (`datasets.IterableDataset`)."""
        return is_stream(self.train_dataset)

    def evaluation_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `evaluate_model` for this task's evaluation data (besides model, processor
        and dataset)."""
        return {
            "batch_size": self.eval_batch_size,
            "columns": self.eval_columns,
            "max_samples": self.max_eval_samples,
            **self.eval_options,
        }


# Keys of a `dataset: {demo: true, ...}` entry, passed to `make_demo_datasets`.
DEMO_KEYS = ("num_train", "num_val", "image_size", "seed")


def load_task_splits(task: TaskRecipe, demo_cache: dict | None = None) -> tuple[Any, Any | None]:
    """The training split and the evaluation split (or `None`) of one task of a recipe.

    `task.dataset` is either `{"demo": true, num_train, num_val, image_size, seed}` (the generated benchmark; the task
    name, or `demo_task`, picks which of its tasks) or keyword arguments of `load_task_dataset` (`path`, `data_files`,
    `name`, ...).
    """
    spec = dict(task.dataset)
    if spec.pop("demo", False):
        demo_task = spec.pop("demo_task", task.name)
        unknown = sorted(set(spec) - set(DEMO_KEYS))
        if unknown:
            raise ValueError(
                f"tasks.{task.name}.dataset: unknown demo keys {unknown}; accepted: {list(DEMO_KEYS)}"
            )
        demo_tasks = [entry["name"] for entry in demo_task_configs()]
        if demo_task not in demo_tasks:
            raise ValueError(f"tasks.{task.name}: no demo task {demo_task!r}; demo tasks are {demo_tasks}")
        # Several recipe tasks may read one generated task (e.g. two orders of one dataset): generate it once.
        key = (demo_task, *sorted(spec.items()))
        cache = demo_cache if demo_cache is not None else {}
        if key not in cache:
            cache[key] = make_demo_datasets(**spec, tasks=[demo_task])[demo_task]
        splits = cache[key]
    else:
        if not spec:
            raise ValueError(
                f"tasks.{task.name}.dataset is empty: give `path` (a folder, data file or Hub id) or `demo: true`"
            )
        try:
            splits = load_task_dataset(**spec)
        except TypeError as error:
            # `datasets` refuses a keyword its builder does not take with a bare TypeError that names neither the
            # recipe key nor where a task option belongs.
            if "unexpected keyword argument" not in str(error):
                raise
            task_options = sorted(set(spec) & {f.name for f in fields(TaskRecipe)})
            hint = (
                f"; {task_options} {'is an option' if len(task_options) == 1 else 'are options'} of the task, "
                f"written beside `dataset` (tasks.{task.name}.{task_options[0]}=...)"
                if task_options
                else ""
            )
            raise ValueError(
                f"tasks.{task.name}.dataset: datasets.load_dataset refused a key ({error}); the keys of `dataset` "
                f"({sorted(spec)}) are passed to it{hint}"
            ) from error
    if task.train_split not in splits:
        raise ValueError(f"tasks.{task.name}: no split {task.train_split!r}; the dataset has {list(splits)}")
    train = splits[task.train_split]
    evaluation = None
    if task.eval_split is not None:
        if task.eval_split not in splits:
            raise ValueError(
                f"tasks.{task.name}: no evaluation split {task.eval_split!r}; the dataset has {list(splits)} "
                "(set eval_split: null to skip evaluation)"
            )
        evaluation = splits[task.eval_split]
    if task.max_train_samples is not None:
        if is_stream(train):
            train = train.take(task.max_train_samples)
        else:
            train = train.select(range(min(task.max_train_samples, len(train))))
    return train, evaluation


def is_stream(dataset: Any) -> bool:
    """Whether `dataset` is a streamed `datasets.IterableDataset` (read as it goes, length unknown)."""
    return isinstance(dataset, datasets.IterableDataset)


def stream_rows(task: TaskRecipe, train: Any) -> int | None:
    """Rows of one epoch of a streamed training split: the recipe's `num_train_rows`, else `max_train_samples`, else
    the split size the dataset's metadata records (Hub datasets), else `None` (endless; measured in steps)."""
    if task.num_train_rows is not None:
        return task.num_train_rows
    if task.max_train_samples is not None:
        return task.max_train_samples
    splits = getattr(getattr(train, "info", None), "splits", None) or {}
    split = splits.get(task.train_split)
    return getattr(split, "num_examples", None) or None


def task_entry(task: TaskRecipe, train_dataset: Any) -> dict[str, Any]:
    """The task's entry of `ModSquadConfig.tasks`: name, type, labels (given, from the demo benchmark, or read from the
    dataset's `ClassLabel` feature) and the recipe's extra `head` fields."""
    demo = {entry["name"]: entry for entry in demo_task_configs()}
    base: dict[str, Any] = {}
    if task.dataset.get("demo"):
        base = dict(demo[task.dataset.get("demo_task", task.name)])
    entry = {**base, "name": task.name, **dict(task.head)}
    if task.type is not None:
        entry["type"] = task.type
    if "type" not in entry:
        raise ValueError(f"tasks.{task.name}: `type` is required; accepted types are {list(TASK_TYPES)}")
    if task.labels is not None:
        entry["labels"] = list(task.labels)
        entry.pop("id2label", None)
    if entry["type"] in LABELLED_TASK_TYPES and not any(
        k in entry for k in ("labels", "id2label", "num_labels")
    ):
        names = class_names(train_dataset, entry["type"], task.columns)
        if names is None:
            raise ValueError(
                f"tasks.{task.name}: the dataset has no ClassLabel feature to read class names from; give `labels` "
                "(a list of names) or head: {num_labels: N} in the recipe"
            )
        entry["labels"] = names
    return entry


def class_names(dataset: Any, task_type: str, columns: dict[str, str] | None = None) -> list[str] | None:
    """Class names from the `ClassLabel` feature of a classification `label` or detection `objects.category`."""
    features = getattr(dataset, "features", None) or {}
    columns = columns or {}
    if task_type == "image-classification":
        feature = features.get(columns.get("label", "label"))
    elif task_type == "object-detection":
        objects = features.get(columns.get("objects", "objects"), {})
        feature = objects.get(columns.get("category", "category")) if isinstance(objects, dict) else None
        feature = getattr(feature, "feature", feature)  # List(ClassLabel) -> ClassLabel
    else:
        return None
    names = getattr(feature, "names", None)
    return list(names) if names else None


def make_train_loader(
    dataset: Any,
    adapter: TaskDataAdapter,
    batch_size: int,
    num_workers: int,
    seed: int,
    task_index: int,
    skip_bad_rows: bool = False,
):
    """The `make_loader(rows, epoch)` of a [`TaskStream`] (map-style `dataset`) or a [`StreamingTaskStream`]
    (streamed `dataset`): a DataLoader over the adapted rows `rows`, in order.

    Each row's augmentation is seeded by `(epoch seed, row index)` (what `AdaptedDataset` does with a `(row, seed)`
    key) or, for a stream, by `(epoch seed, process, position in its pass)`, never by its position in the loader, so
    a run resumed mid-epoch augments exactly as the uninterrupted one. A stream's rows are read in the main process
    and decoded and augmented in the workers. With `skip_bad_rows`, a row of a map-style dataset that cannot be used
    is replaced by the next good one and reported in the batch's `skipped_rows` (the trainer counts them against
    `training.max_bad_rows`).
    """
    if is_stream(dataset):
        stream_rows_adapted = AdaptedStreamRows(dataset.features, adapter)

        def make_stream_loader(rows: Iterable, epoch: int) -> Iterable:
            seed_of_epoch = epoch_seed(seed, task_index, epoch)
            return DataLoader(
                stream_rows_adapted,
                batch_size=batch_size,
                sampler=((row, seed_of_epoch, key) for key, row in rows),
                collate_fn=adapter.collate,
                num_workers=num_workers,
                drop_last=True,  # a pass's last, partial batch is dropped: every step's batches are full
            )

        return make_stream_loader

    adapted = AdaptedDataset(dataset, adapter, skip_bad_rows=skip_bad_rows)

    def make_loader(rows: list[int], epoch: int) -> Iterable:
        seed_of_epoch = epoch_seed(seed, task_index, epoch)
        return DataLoader(
            adapted,
            batch_size=batch_size,
            sampler=[(row, seed_of_epoch) for row in rows],
            collate_fn=adapter.collate,
            num_workers=num_workers,
            drop_last=False,
        )

    return make_loader


def build_task_data(
    recipe: TrainingRecipe, processor: Any | None = None, start: StartingPoint | None = None
) -> tuple[list[TaskData], Any]:
    """Loads every task of `recipe` and returns its [`TaskData`] (with the model task entry in `config_entry`) and the
    image processor to save with the model (at the largest task resolution, unless one is given).

    The processors take their settings (mean, std, resampling) and the default resolution from the checkpoint the
    model starts from (`start`, read from the recipe when not given, before any data is loaded)."""
    start = start if start is not None else resolve_starting_point(recipe)
    demo_cache: dict = {}
    tasks = []
    for index, task in enumerate(recipe.tasks):
        train, evaluation = load_task_splits(task, demo_cache)
        entry = task_entry(task, train)
        size = start.image_size(task)
        task_processor = ModSquadImageProcessor(
            size={"height": size, "width": size}, **start.processor_settings
        )
        adapter = TaskDataAdapter(
            entry,
            task_processor,
            train=True,
            image_size=size,
            columns=task.columns,
            augment=task.augment,
            schema_options=task.schema,
        )
        tasks.append(
            TaskData(
                name=task.name,
                train_dataset=train,
                make_loader=make_train_loader(
                    train,
                    adapter,
                    task.batch_size,
                    recipe.training.num_workers,
                    recipe.seed,
                    index,
                    skip_bad_rows=recipe.training.max_bad_rows > 0,
                ),
                batch_size=task.batch_size,
                eval_dataset=evaluation,
                processor=task_processor,
                eval_columns=task.columns,
                eval_options=dict(task.schema),
                eval_batch_size=task.eval_batch_size or task.batch_size,
                max_eval_samples=task.max_eval_samples,
                loss_weight=task.loss_weight,
                config_entry=entry,
                num_train_rows=stream_rows(task, train) if is_stream(train) else None,
            )
        )
    if processor is None:
        size = max(start.image_size(task) for task in recipe.tasks)
        processor = ModSquadImageProcessor(size={"height": size, "width": size}, **start.processor_settings)
    return tasks, processor


def build_model(
    recipe: TrainingRecipe, tasks: list[TaskData], start: StartingPoint | None = None
) -> ModSquadForMultiTask:
    """The [`ModSquadForMultiTask`] to train over the tasks' entries: new from `recipe.model.config`, loaded from a
    ModSquad `recipe.model.pretrained`, or upcycled from a dense one (see [`StartingPoint`]).

    Seeds with `recipe.seed` first, so that every process of a run builds the same initial weights."""
    start = start if start is not None else resolve_starting_point(recipe)
    set_seed(recipe.seed)
    entries = [task.config_entry for task in tasks]
    if any(entry is None for entry in entries):
        raise ValueError("every TaskData needs its config_entry to build a model from a recipe")
    options = {}
    if recipe.model.experts_implementation is not None:
        options["experts_implementation"] = recipe.model.experts_implementation
    if start.is_dense:
        return _upcycled_model(recipe, entries)
    if recipe.model.pretrained:
        pretrained = check_path_or_repo_id(recipe.model.pretrained, "model.pretrained")
        model = ModSquadForMultiTask.from_pretrained(pretrained, **options)
        if model.config.task_names != [e["name"] for e in entries]:
            raise ValueError(
                f"the pretrained model has tasks {model.config.task_names}, the recipe {[e['name'] for e in entries]}"
            )
        _check_task_resolutions(recipe, model.config.patch_size)
        return model
    fields = dict(recipe.model.config)
    fields.setdefault("image_size", max(start.image_size(task) for task in recipe.tasks))
    config = ModSquadConfig(tasks=entries, **fields)
    _check_task_resolutions(recipe, config.patch_size)
    model = ModSquadForMultiTask(config)
    if recipe.model.experts_implementation is not None:
        model.set_experts_implementation(recipe.model.experts_implementation)
    return model


def _upcycled_model(recipe: TrainingRecipe, entries: list[dict[str, Any]]) -> ModSquadForMultiTask:
    """[`ModSquadForMultiTask.from_dense`] of the recipe's dense `model.pretrained`, with `model.config`'s MoE fields
    and `model.upcycling`'s options, in float32 (mixed precision is the loop's business)."""
    options = recipe.model.upcycling
    model = ModSquadForMultiTask.from_dense(
        recipe.model.pretrained,
        router_init_std=options.get("router_init_std"),
        dense_kwargs={"dtype": torch.float32},
        upcycling_mode=options.get("mode", "copy"),
        tasks=entries,
        **recipe.model.config,
    )
    if recipe.model.experts_implementation is not None:
        model.set_experts_implementation(recipe.model.experts_implementation)
    return model


def _check_task_resolutions(recipe: TrainingRecipe, patch_size: int) -> None:
    """Every task's resolution must be whole patches: the patch embedding would silently drop the remainder."""
    for task in recipe.tasks:
        if task.image_size is not None and task.image_size % patch_size:
            raise ValueError(
                f"tasks.{task.name}.image_size={task.image_size} is not a multiple of the model's patch_size="
                f"{patch_size}; use e.g. {max(patch_size, round(task.image_size / patch_size) * patch_size)}"
            )


__all__ = [
    "TaskData",
    "build_model",
    "build_task_data",
    "class_names",
    "is_stream",
    "load_task_splits",
    "make_train_loader",
    "stream_rows",
    "task_entry",
]
