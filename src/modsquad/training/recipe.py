"""Training recipes: the dataclasses a YAML recipe is read into, and command-line overrides of their fields.

A recipe has five sections (see `training/configs/*.yaml`):

```yaml
output_dir: runs/demo
seed: 0
model: {config: {hidden_size: 192, ...}, pretrained: null}   # ModSquadConfig fields; tasks come from `tasks`
tasks:                                                      # one entry per task, in task-id order
  - {name: cls, type: image-classification, dataset: {path: ...}, batch_size: 32, image_size: 64}
mixing: {strategy: simt, temperature: 2.0}
optimization: {learning_rate: 1e-3, warmup_steps: 100, loss_weighting: fixed}
training: {max_steps: 1000, eval_every: 200, save_every: 200, keep_last: 2, tracker: csv}
```

Overrides are `dotted.key=value` strings whose value is parsed as YAML: `training.max_steps=50`,
`tasks.cls.batch_size=8` (a task by name or position), `optimization.learning_rate=3e-4`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.mixing import STRATEGIES
from ..model.configuration_modsquad import TASK_TYPES


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 reads `3e-4` (no dot) as a string; recipes mean a float, as YAML 1.2 and JSON do."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """YAML as recipes read it (floats like `1e-3` included)."""
    return yaml.load(text, Loader=_RecipeLoader)


LOSS_WEIGHTINGS = ("fixed", "uncertainty")
MI_ESTIMATORS = ("step", "streaming")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
TRACKERS = ("csv", "tensorboard", "none")


@dataclass
class TaskRecipe:
    r"""
    One task of a multi-task run: where its data comes from and how it is batched and weighted.

    Args:
        name (`str`): task name (an identifier; names the head and the metrics).
        type (`str`, *optional*): task type, one of `TASK_TYPES`; may be left out for the built-in demo tasks.
        dataset (`dict`, *optional*): where the data is: keyword arguments of `load_task_dataset` (e.g.
            `{"path": "../shared/data/cls"}` or a Hub id), or `{"demo": true}` for the generated demo data.
        train_split (`str`, *optional*, defaults to `"train"`): split trained on.
        eval_split (`str`, *optional*, defaults to `"validation"`): split evaluated on (`null`: no evaluation).
        columns (`dict[str, str]`, *optional*): column renames of the dataset (see `TaskDataAdapter`).
        schema (`dict`, *optional*): schema options of the dataset, for training and evaluation alike:
            `bbox_format` (`"xywh"` COCO pixels, the default, or `"xyxy"`) for detection, `reduce_labels: true` for
            segmentation datasets whose id 0 means "unlabelled" (scene_parse_150).
        labels (`list[str]`, *optional*): class names; read from the dataset's `ClassLabel` feature when not given.
        head (`dict`, *optional*): extra fields of the model's task entry (`ignore_index`, `max_depth`, ...).
        batch_size (`int`, *optional*, defaults to 32): training batch size per process.
        eval_batch_size (`int`, *optional*): evaluation batch size; defaults to `batch_size`.
        image_size (`int`, *optional*, defaults to 224): training and evaluation resolution of this task.
        augment (`bool` or `dict`, *optional*, defaults to `True`): training augmentation (a dict overrides the
            task type's `AugmentConfig` defaults).
        loss_weight (`float`, *optional*, defaults to 1.0): fixed weight of the task loss (and the prior weight
            under uncertainty weighting).
        max_train_samples, max_eval_samples (`int`, *optional*): keep only the first rows (quick runs).
    """

    name: str
    type: str | None = None
    dataset: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str | None = "validation"
    columns: dict[str, str] | None = None
    schema: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    head: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    eval_batch_size: int | None = None
    image_size: int = 224
    augment: bool | dict[str, Any] = True
    loss_weight: float = 1.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"task name must be a Python identifier, got {self.name!r}")
        if self.type is not None and self.type not in TASK_TYPES:
            raise ValueError(f"task {self.name!r}: type={self.type!r}; accepted: {list(TASK_TYPES)}")
        for key in ("batch_size", "image_size"):
            _check_positive_int(f"tasks.{self.name}.{key}", getattr(self, key))
        for key in ("eval_batch_size", "max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None:
                _check_positive_int(f"tasks.{self.name}.{key}", getattr(self, key))
        if not isinstance(self.loss_weight, (int, float)) or self.loss_weight < 0:
            raise ValueError(f"tasks.{self.name}.loss_weight must be a number >= 0, got {self.loss_weight!r}")
        if not isinstance(self.dataset, dict):
            raise ValueError(f"tasks.{self.name}.dataset must be a mapping, got {self.dataset!r}")


@dataclass
class ModelRecipe:
    r"""
    The model to train.

    Args:
        config (`dict`, *optional*): `ModSquadConfig` fields; `tasks` is filled from the recipe's tasks and
            `image_size` defaults to the largest task resolution.
        pretrained (`str`, *optional*): a folder or Hub id to start from instead (its tasks must match).
        experts_implementation (`str`, *optional*): experts kernel (`"sorted_mm"` by default, `"grouped_mm"`, ...).
    """

    config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    experts_implementation: str | None = None


@dataclass
class MixingRecipe:
    r"""
    How tasks are mixed into steps (see `modsquad.data.mixing`).

    Args:
        strategy (`str`, *optional*, defaults to `"simt"`): `"simt"`, `"proportional"`, `"temperature"`, `"uniform"`.
        temperature (`float`, *optional*, defaults to 2.0): `tau` of the `"temperature"` strategy.
        tasks_per_step (`int`, *optional*): micro-batches per step of the sampling strategies (default: #tasks).
    """

    strategy: str = "simt"
    temperature: float = 2.0
    tasks_per_step: int | None = None

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"mixing.strategy={self.strategy!r}; accepted: {list(STRATEGIES)}")
        if not isinstance(self.temperature, (int, float)) or self.temperature <= 0:
            raise ValueError(f"mixing.temperature must be a number > 0, got {self.temperature!r}")
        if self.tasks_per_step is not None:
            _check_positive_int("mixing.tasks_per_step", self.tasks_per_step)


@dataclass
class OptimizationRecipe:
    r"""
    Optimiser, schedule and loss weighting.

    Args:
        learning_rate (`float`, *optional*, defaults to 1e-3): peak AdamW learning rate.
        weight_decay (`float`, *optional*, defaults to 0.05): decoupled weight decay (not applied to biases, norms,
            tokens, position embeddings and loss log-variances).
        betas (`list[float]`, *optional*, defaults to `[0.9, 0.999]`): AdamW betas.
        warmup_steps (`int`, *optional*, defaults to 0): linear warm-up steps (optimizer steps).
        warmup_ratio (`float`, *optional*, defaults to 0.0): warm-up as a fraction of all steps (the larger wins).
        min_lr_ratio (`float`, *optional*, defaults to 0.0): the cosine decays to `learning_rate * min_lr_ratio`.
        max_grad_norm (`float`, *optional*, defaults to 1.0): gradient clipping norm (`0` or `null`: no clipping).
        loss_weighting (`str`, *optional*, defaults to `"fixed"`): `"fixed"` (the tasks' `loss_weight`) or
            `"uncertainty"` (Kendall et al.: learned log-variances).
        mi_estimator (`str`, *optional*, defaults to `"step"`): statistics of the mutual-information loss.
            `"step"`: exact, over the task micro-batches of one micro-step (zero for single-task steps);
            `"streaming"`: a running estimate over recent steps that each micro-batch differentiates through its own
            share (`StreamingRoutingStatistics`): a signal for every step whatever the sampler, and needed for
            `training.one_task_at_a_time`.
        mi_horizon (`float`, *optional*, defaults to 10.0): observations of a task the streaming estimate averages
            over (EMA horizon; `>= 1`).
    """

    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    loss_weighting: str = "fixed"
    mi_estimator: str = "step"
    mi_horizon: float = 10.0

    def __post_init__(self):
        if self.mi_estimator not in MI_ESTIMATORS:
            raise ValueError(
                f"optimization.mi_estimator={self.mi_estimator!r}; accepted: {list(MI_ESTIMATORS)}"
            )
        if (
            isinstance(self.mi_horizon, bool)
            or not isinstance(self.mi_horizon, (int, float))
            or self.mi_horizon < 1
        ):
            raise ValueError(f"optimization.mi_horizon must be a number >= 1, got {self.mi_horizon!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"optimization.loss_weighting={self.loss_weighting!r}; accepted: {list(LOSS_WEIGHTINGS)}"
            )
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise ValueError(f"optimization.learning_rate must be a number > 0, got {self.learning_rate!r}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"optimization.warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1], got "
                f"{self.warmup_ratio!r} and {self.min_lr_ratio!r}"
            )
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"optimization.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimization.betas must be two numbers in [0, 1), got {self.betas!r}")


@dataclass
class LoopRecipe:
    r"""
    Length, precision, logging, evaluation and checkpoints of the loop.

    Args:
        max_steps (`int`, *optional*): optimizer steps to train; `num_epochs` is used when not given.
        num_epochs (`float`, *optional*, defaults to 1.0): length in mixer epochs (see `MultiTaskMixer`).
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): multi-task micro-steps per optimizer step.
            The mutual-information window is one micro-step (all its task batches).
        mixed_precision (`str`, *optional*, defaults to `"auto"`): `"auto"` (bf16 on GPUs that have it, else fp16
            on GPU; full precision on CPU), `"no"`, `"fp16"`, `"bf16"` (also on CPU when asked).
        cpu (`bool`, *optional*, defaults to `False`): train on the CPU even when a GPU is present.
        log_every (`int`, *optional*, defaults to 10): steps between tracker logs and training-log lines.
        eval_every (`int`, *optional*, defaults to 0): steps between evaluations (0: only at the end).
        eval_at_end (`bool`, *optional*, defaults to `True`): evaluate every task after the last step.
        save_every (`int`, *optional*, defaults to 0): steps between checkpoints (0: only on interruption).
        keep_last (`int`, *optional*, defaults to 2): checkpoints kept; older ones are deleted.
        tracker (`str`, *optional*, defaults to `"csv"`): `"csv"`, `"tensorboard"` or `"none"`.
        num_workers (`int`, *optional*, defaults to 0): DataLoader workers per task.
        find_unused_parameters (`bool`, *optional*): DDP's flag; by default on exactly when the mixing strategy
            can leave a task (hence its head) out of a step.
        usage_ema_decay (`float`, *optional*, defaults to 0.99): decay of the per-task expert-usage EMA.
        save_final_model (`bool`, *optional*, defaults to `True`): write `final/` with `save_pretrained`.
        one_task_at_a_time (`bool`, *optional*, defaults to `False`): run each task micro-batch's forward and
            backward on its own (gradients accumulate, the optimizer steps once per step), so that the activations
            of one task batch are alive at a time instead of those of every task of the step. Needs
            `optimization.mi_estimator: streaming`.
    """

    max_steps: int | None = None
    num_epochs: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "auto"
    cpu: bool = False
    log_every: int = 10
    eval_every: int = 0
    eval_at_end: bool = True
    save_every: int = 0
    keep_last: int = 2
    tracker: str = "csv"
    num_workers: int = 0
    find_unused_parameters: bool | None = None
    usage_ema_decay: float = 0.99
    save_final_model: bool = True
    one_task_at_a_time: bool = False

    def __post_init__(self):
        if not isinstance(self.one_task_at_a_time, bool):
            raise ValueError(
                f"training.one_task_at_a_time must be true or false, got {self.one_task_at_a_time!r}"
            )
        if self.one_task_at_a_time and self.find_unused_parameters is False:
            raise ValueError(
                "training.find_unused_parameters=false contradicts one_task_at_a_time=true: each forward leaves the "
                "other tasks' heads unused; accepted: true or null"
            )
        if self.max_steps is not None:
            _check_positive_int("training.max_steps", self.max_steps)
        elif not isinstance(self.num_epochs, (int, float)) or self.num_epochs <= 0:
            raise ValueError(f"training.num_epochs must be a number > 0, got {self.num_epochs!r}")
        _check_positive_int("training.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive_int("training.log_every", self.log_every)
        _check_positive_int("training.keep_last", self.keep_last)
        for key in ("eval_every", "save_every", "num_workers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"training.{key} must be an int >= 0, got {value!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"training.mixed_precision={self.mixed_precision!r}; accepted: {list(MIXED_PRECISIONS)}"
            )
        if self.tracker not in TRACKERS:
            raise ValueError(f"training.tracker={self.tracker!r}; accepted: {list(TRACKERS)}")
        if not 0.0 <= self.usage_ema_decay < 1.0:
            raise ValueError(f"training.usage_ema_decay must be in [0, 1), got {self.usage_ema_decay!r}")


@dataclass
class TrainingRecipe:
    r"""
    A whole multi-task training run.

    Args:
        tasks (`list[TaskRecipe]`): the tasks, in task-id order.
        output_dir (`str`, *optional*, defaults to `"runs/modsquad"`): run folder (checkpoints, logs, final model).
        seed (`int`, *optional*, defaults to 0): seed of the model init, the data order and the task draws.
        model, mixing, optimization, training: the sections above.
        resume (`str`, *optional*): checkpoint folder to resume from, or `"latest"` (newest in `output_dir`).
    """

    tasks: list[TaskRecipe]
    output_dir: str = "runs/modsquad"
    seed: int = 0
    model: ModelRecipe = field(default_factory=ModelRecipe)
    mixing: MixingRecipe = field(default_factory=MixingRecipe)
    optimization: OptimizationRecipe = field(default_factory=OptimizationRecipe)
    training: LoopRecipe = field(default_factory=LoopRecipe)
    resume: str | None = None

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("a recipe needs at least one task under `tasks`")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if self.mixing.tasks_per_step is not None and self.mixing.strategy == "simt":
            raise ValueError("mixing.tasks_per_step applies to the sampling strategies, not to 'simt'")
        if self.training.one_task_at_a_time and self.optimization.mi_estimator != "streaming":
            raise ValueError(
                "training.one_task_at_a_time needs optimization.mi_estimator='streaming': the per-step estimator's "
                f"gradient needs every task of the step in one graph (got mi_estimator={self.optimization.mi_estimator!r}"
                "; accepted with one task at a time: ['streaming'])"
            )

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingRecipe:
        """Builds a recipe from nested dicts, rejecting unknown keys with the list of accepted ones."""
        if not isinstance(data, dict):
            raise ValueError(f"a recipe must be a mapping, got {type(data).__name__}")
        data = dict(data)
        tasks = data.pop("tasks", None)
        if not isinstance(tasks, list):
            raise ValueError(f"recipe `tasks` must be a list of task mappings, got {tasks!r}")
        sections = {"model": ModelRecipe, "mixing": MixingRecipe, "optimization": OptimizationRecipe}
        sections["training"] = LoopRecipe
        kwargs: dict[str, Any] = {
            "tasks": [_build(TaskRecipe, t, f"tasks[{i}]") for i, t in enumerate(tasks)]
        }
        for key, value in data.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value or {}, key)
            elif key in ("output_dir", "seed", "resume"):
                kwargs[key] = value
            else:
                accepted = ["tasks", "output_dir", "seed", "resume", *sections]
                raise ValueError(f"unknown recipe key {key!r}; accepted: {accepted}")
        return cls(**kwargs)


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"recipe section {where} must be a mapping, got {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; accepted: {names}")
    return cls(**values)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies `dotted.key=value` overrides (values parsed as YAML) to a raw recipe dict, in place.

    A path component that meets a list selects an item by position or, for `tasks`, by task name.
    """
    for override in overrides:
        if "=" not in override:
            raise ValueError(
                f"override {override!r} must look like section.key=value, e.g. training.max_steps=10"
            )
        path, raw = override.split("=", 1)
        keys = path.strip().split(".")
        node: Any = data
        for depth, key in enumerate(keys[:-1]):
            node = _child(node, key, ".".join(keys[: depth + 1]))
        last = keys[-1]
        value = parse_yaml(raw)
        if isinstance(node, list):
            node[_list_index(node, last, path)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ValueError(f"override {override!r}: {'.'.join(keys[:-1])} is not a section")
    return data


def _child(node: Any, key: str, where: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, key, where)]
    if not isinstance(node, dict):
        raise ValueError(f"override path {where!r} goes through a value, not a section")
    if node.get(key) is None:
        node[key] = {}
    return node[key]


def _list_index(items: list, key: str, where: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    names = [item.get("name") for item in items if isinstance(item, dict)]
    raise ValueError(
        f"override path {where!r}: no item {key!r}; use a position < {len(items)} or one of {names}"
    )


def load_recipe(
    path: str | Path | None = None, overrides: list[str] | None = None, **data: Any
) -> TrainingRecipe:
    """Reads a YAML recipe (or starts from `data`), applies `overrides`, validates and returns it.

    Args:
        path (`str` or `Path`, *optional*): YAML file.
        overrides (`list[str]`, *optional*): `dotted.key=value` strings, applied after the file.
        **data: top-level recipe keys merged over the file before the overrides.

    Returns:
        [`TrainingRecipe`].
    """
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"recipe file {str(path)!r} does not exist")
        raw = parse_yaml(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"recipe file {str(path)!r} must hold a mapping at the top level")
    raw.update(data)
    apply_overrides(raw, list(overrides or []))
    return TrainingRecipe.from_dict(raw)


__all__ = [
    "LoopRecipe",
    "MixingRecipe",
    "ModelRecipe",
    "OptimizationRecipe",
    "TaskRecipe",
    "TrainingRecipe",
    "apply_overrides",
    "load_recipe",
]
