"""Training recipes: the dataclasses a YAML recipe is read into, and command-line overrides of their fields.

A recipe has five sections (see `training/configs/*.yaml`):

```yaml
output_dir: runs/demo
seed: 0
model: {config: {hidden_size: 192, ...}, pretrained: null}   # ModSquadConfig fields; tasks come from `tasks`
# or: model: {pretrained: facebook/dinov2-small, config: {num_experts: 16, ...}, upcycling: {mode: copy}}
tasks:                                                      # one entry per task, in task-id order
  - {name: cls, type: image-classification, dataset: {path: ...}, batch_size: 32, image_size: 64}
mixing: {strategy: simt, temperature: 2.0}
optimization: {learning_rate: 1e-3, warmup_steps: 100, loss_weighting: fixed}
training: {max_steps: 1000, eval_every: 200, save_every: 200, keep_last: 2, tracker: csv}
```

Overrides are `dotted.key=value` strings whose value is parsed as YAML: `training.max_steps=50`,
`tasks.cls.batch_size=8` (a task by name or position), `optimization.learning_rate=3e-4`.

A value written `???` (OmegaConf's and Hydra's mark of a mandatory value) must be given by an override, e.g. the
data paths of a recipe whose data lives on the user's machine: `tasks.cls.dataset.path=/data/cls`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adaptation.upcycling import UPCYCLING_MODES
from ..data.mixing import STRATEGIES
from ..model.configuration_modsquad import (
    TASK_TYPES,
    ModSquadConfig,
    accepted_task_keys,
    check_bool,
    check_number,
    check_task_name,
    did_you_mean,
    reject_unknown_keys,
)
from .tracking import check_tracker_names


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


# A recipe value that an override must replace (OmegaConf's MISSING).
REQUIRED = "???"
LOSS_WEIGHTINGS = ("fixed", "uncertainty")
MI_ESTIMATORS = ("step", "streaming")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")
UPCYCLING_OPTIONS = ("mode", "router_init_std")


@dataclass
class TaskRecipe:
    r"""
    One task of a multi-task run: where its data comes from and how it is batched and weighted.

    Args:
        name (`str`): task name (an identifier; names the head and the metrics).
        type (`str`, *optional*): task type, one of `TASK_TYPES`; may be left out for the built-in demo tasks.
        dataset (`dict`, *optional*): where the data is: keyword arguments of `load_task_dataset` (e.g.
            `{"path": "data/cls"}`, a Hub id, `streaming: true` to read as it trains), or `{"demo": true}` for
            the generated demo data.
        train_split (`str`, *optional*, defaults to `"train"`): split trained on.
        eval_split (`str`, *optional*, defaults to `"validation"`): split evaluated on (`null`: no evaluation).
        columns (`dict[str, str]`, *optional*): column renames of the dataset (see `TaskDataAdapter`).
        schema (`dict`, *optional*): schema options of the dataset, for training and evaluation alike:
            `bbox_format` (`"xywh"` COCO pixels, the default, or `"xyxy"`) for detection, `reduce_labels: true` for
            segmentation datasets whose id 0 means "unlabelled" (scene_parse_150).
        labels (`list[str]`, *optional*): class names (a non-empty list of distinct names); read from the dataset's
            `ClassLabel` feature when not given.
        head (`dict`, *optional*): extra fields of the model's task entry (`ignore_index`, `max_depth`,
            `depth_scale`, ...; see `ModSquadConfig`); unknown keys are rejected.
        batch_size (`int`, *optional*, defaults to 32): training batch size per process.
        eval_batch_size (`int`, *optional*): evaluation batch size; defaults to `batch_size`.
        image_size (`int`, *optional*): training and evaluation resolution of this task (a multiple of the patch
            size; position embeddings are interpolated). Defaults to the resolution of the checkpoint the model starts
            from (its image processor's crop or resize size), or 224 from scratch.
        augment (`bool` or `dict`, *optional*, defaults to `True`): training augmentation (a dict overrides the
            task type's `AugmentConfig` defaults).
        loss_weight (`float`, *optional*, defaults to 1.0): fixed weight of the task loss (and the prior weight
            under uncertainty weighting).
        max_train_samples, max_eval_samples (`int`, *optional*): keep only the first rows (quick runs); for a
            streamed training split, also its number of rows.
        num_train_rows (`int`, *optional*): rows of a streamed training split (`dataset.streaming: true`), which a
            stream does not know: one epoch of this task. Without it (and without `max_train_samples`) the task's
            stream is endless and the run needs `training.max_steps`.
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
    image_size: int | None = None
    augment: bool | dict[str, Any] = True
    loss_weight: float = 1.0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    num_train_rows: int | None = None

    def __post_init__(self):
        check_task_name(self.name, "task name")
        where = f"tasks.{self.name}"
        if self.type is not None and self.type not in TASK_TYPES:
            raise ValueError(
                f"{where}.type={self.type!r}; accepted: {list(TASK_TYPES)}{did_you_mean(self.type, TASK_TYPES)}"
            )
        check_number(f"{where}.batch_size", self.batch_size, minimum=1, integer=True)
        # image_size may be left out: the starting checkpoint's resolution (224 from scratch).
        for key in (
            "image_size",
            "eval_batch_size",
            "max_train_samples",
            "max_eval_samples",
            "num_train_rows",
        ):
            check_number(f"{where}.{key}", getattr(self, key), minimum=1, integer=True, optional=True)
        check_number(f"{where}.loss_weight", self.loss_weight, minimum=0)
        for key in ("dataset", "schema", "head"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{where}.{key} must be a mapping, got {getattr(self, key)!r}")
        if self.columns is not None and not isinstance(self.columns, dict):
            raise ValueError(f"{where}.columns must be a mapping of role: column, got {self.columns!r}")
        if not isinstance(self.augment, dict):
            check_bool(f"{where}.augment", self.augment)
        if self.labels is not None:
            labels = self.labels
            if isinstance(labels, (str, dict)) or not isinstance(labels, list) or not labels:
                raise ValueError(f"{where}.labels must be a non-empty list of class names, got {labels!r}")
            duplicates = sorted({str(x) for x in labels if labels.count(x) > 1})
            if duplicates:
                raise ValueError(f"{where}.labels has duplicate class names {duplicates}")
        for key in ("name", "type"):
            if key in self.head:
                raise ValueError(
                    f"{where}.head.{key}: set the task's {key} in the task entry itself, not in head"
                )
        task_type = self.type or _demo_task_type(self)
        if task_type is not None:
            accepted = [k for k in accepted_task_keys(task_type) if k not in ("name", "type", "labels")]
            reject_unknown_keys(self.head, accepted, f"{where}.head ({task_type})")


def _demo_task_type(task: TaskRecipe) -> str | None:
    """The task type of a task trained on the generated demo data (its recipe entry may leave `type` out)."""
    if not task.dataset.get("demo"):
        return None
    from ..data.demo import demo_task_configs

    types = {entry["name"]: entry["type"] for entry in demo_task_configs()}
    return types.get(task.dataset.get("demo_task", task.name))


@dataclass
class ModelRecipe:
    r"""
    The model to train.

    Args:
        config (`dict`, *optional*): `ModSquadConfig` fields; `tasks` is filled from the recipe's tasks and, from
            scratch, `image_size` defaults to the largest task resolution. Upcycling a dense checkpoint takes its
            shape (`hidden_size`, `num_hidden_layers`, `patch_size`, ...) from it: those may be left out, or given
            with the checkpoint's values; the MoE fields (`num_experts`, `num_experts_per_tok`, `moe_layers`,
            `moe_attention`, ...) say how it is upcycled.
        pretrained (`str`, *optional*): a folder or Hub id to start from: a ModSquad checkpoint (its tasks must
            match) or a dense ViT / DeiT / DINOv2 (e.g. `facebook/dinov2-small`), upcycled into the model of
            `config`. The image processors take their mean, std, resampling and default resolution from it.
        experts_implementation (`str`, *optional*): experts kernel (`"auto"` by default: `"sorted_mm"` on CPU,
            a grouped GEMM on GPUs; `"sorted_mm"`, `"grouped_mm"`, ...).
        upcycling (`dict`, *optional*): options for a dense `pretrained`: `mode` (`"copy"`, the default: every
            expert a copy of the dense MLP; `"partition"`: compute-matched experts, each `1 / num_experts_per_tok` of
            its hidden units) and `router_init_std` (std of the routers' random init; defaults to the checkpoint's
            `initializer_range`). See `modsquad.adaptation.upcycling`.
    """

    config: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    experts_implementation: str | None = None
    upcycling: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.config, dict):
            raise ValueError(f"model.config must be a mapping of ModSquadConfig fields, got {self.config!r}")
        if "tasks" in self.config:
            raise ValueError(
                "model.config.tasks comes from the recipe's `tasks`; remove it from model.config"
            )
        # The values are checked when the config is built; a misspelt key would silently fall back to a default.
        reject_unknown_keys(
            self.config, ModSquadConfig.accepted_keys(), "model.config", shown="ModSquadConfig fields"
        )
        for key in ("pretrained", "experts_implementation"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"model.{key} must be a string, got {value!r}")
        if self.pretrained is not None and not self.pretrained:
            raise ValueError(f"model.pretrained must be a folder or Hub id, got {self.pretrained!r}")
        if not isinstance(self.upcycling, dict):
            raise ValueError(f"model.upcycling must be a mapping, got {self.upcycling!r}")
        reject_unknown_keys(self.upcycling, UPCYCLING_OPTIONS, "model.upcycling")
        mode = self.upcycling.get("mode", "copy")
        if mode not in UPCYCLING_MODES:
            raise ValueError(
                f"model.upcycling.mode={mode!r}; accepted: {list(UPCYCLING_MODES)}{did_you_mean(mode, UPCYCLING_MODES)}"
            )
        check_number(
            "model.upcycling.router_init_std", self.upcycling.get("router_init_std"), minimum=0, optional=True
        )
        if self.upcycling and not self.pretrained:
            raise ValueError(
                "model.upcycling applies when model.pretrained names a dense ViT / DeiT / DINOv2 checkpoint; "
                "set model.pretrained or remove model.upcycling"
            )


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
        check_number("mixing.temperature", self.temperature, minimum=0, exclusive_minimum=True)
        check_number("mixing.tasks_per_step", self.tasks_per_step, minimum=1, integer=True, optional=True)


@dataclass
class OptimizationRecipe:
    r"""
    Optimiser, schedule and loss weighting.

    Args:
        learning_rate (`float`, *optional*, defaults to 1e-3): peak AdamW learning rate (of every parameter, unless
            `backbone_learning_rate` or `layer_decay` say otherwise for the backbone).
        backbone_learning_rate (`float`, *optional*): peak learning rate of the backbone's parameters that a
            pretrained checkpoint provides: patch and position embeddings, `[CLS]`, attention, norms, MLPs and MLP /
            attention experts (upcycled from the pretrained MLP and attention). `learning_rate` stays that of what is
            new: task heads, routers, task tokens and loss log-variances. Defaults to `learning_rate`.
        layer_decay (`float`, *optional*, defaults to 1.0): layer-wise decay of the backbone learning rate (BEiT):
            with `L` blocks, the embeddings are layer 0, block `i` layer `i + 1`, the final norm layer `L + 1`, and a
            parameter of layer `l` gets `backbone_learning_rate * layer_decay ** (L + 1 - l)`. In (0, 1].
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
    backbone_learning_rate: float | None = None
    layer_decay: float = 1.0
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
        check_number("optimization.mi_horizon", self.mi_horizon, minimum=1)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"optimization.loss_weighting={self.loss_weighting!r}; accepted: {list(LOSS_WEIGHTINGS)}"
            )
        check_number("optimization.learning_rate", self.learning_rate, minimum=0, exclusive_minimum=True)
        check_number(
            "optimization.backbone_learning_rate",
            self.backbone_learning_rate,
            minimum=0,
            exclusive_minimum=True,
            optional=True,
        )
        check_number(
            "optimization.layer_decay", self.layer_decay, minimum=0, maximum=1, exclusive_minimum=True
        )
        check_number("optimization.weight_decay", self.weight_decay, minimum=0)
        check_number("optimization.warmup_steps", self.warmup_steps, minimum=0, integer=True)
        check_number(
            "optimization.warmup_ratio", self.warmup_ratio, minimum=0, maximum=1, exclusive_maximum=True
        )
        check_number("optimization.min_lr_ratio", self.min_lr_ratio, minimum=0, maximum=1)
        # A negative norm would flip the gradient's sign inside clip_grad_norm_: training would climb the loss.
        check_number("optimization.max_grad_norm", self.max_grad_norm, minimum=0, optional=True)
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ValueError(f"optimization.betas must be two numbers in [0, 1), got {self.betas!r}")
        for index, beta in enumerate(self.betas):
            check_number(f"optimization.betas[{index}]", beta, minimum=0, maximum=1, exclusive_maximum=True)


@dataclass
class LoopRecipe:
    r"""
    Length, precision, logging, evaluation and checkpoints of the loop.

    Args:
        max_steps (`int`, *optional*): optimizer steps to train; `num_epochs` is used when not given.
        num_epochs (`float`, *optional*, defaults to 1.0): length in mixer epochs (see `MultiTaskMixer`).
        gradient_accumulation_steps (`int`, *optional*): multi-task micro-steps per optimizer step. The
            mutual-information window is one micro-step (all its task batches). When not set, the launcher's
            (`accelerate launch --gradient_accumulation_steps N`), else 1.
        mixed_precision (`str`, *optional*): `"auto"` (bf16 on GPUs that have it, else fp16 on GPU; full precision
            on CPU), `"no"`, `"fp16"`, `"bf16"` (also on CPU when asked). When not set, Accelerate's own
            configuration decides (`accelerate launch --mixed_precision bf16`, or the `accelerate config` file that
            `accelerate launch` reads); without a launcher, `"auto"`.
        cpu (`bool`, *optional*, defaults to `False`): train on the CPU even when a GPU is present.
        log_every (`int`, *optional*, defaults to 10): steps between tracker logs and training-log lines.
        eval_every (`int`, *optional*, defaults to 0): steps between evaluations (0: only at the end).
        eval_at_end (`bool`, *optional*, defaults to `True`): evaluate every task after the last step.
        save_every (`int`, *optional*, defaults to 0): steps between checkpoints (0: only on interruption).
        keep_last (`int`, *optional*, defaults to 2): checkpoints kept; older ones are deleted.
        tracker (`str` or `list[str]`, *optional*, defaults to `"csv"`): experiment tracker(s): `"csv"`, any tracker
            Accelerate supports (`"tensorboard"`, `"wandb"`, `"trackio"`, `"mlflow"`, `"comet_ml"`, `"aim"`,
            `"clearml"`, `"dvclive"`, `"swanlab"`), `"all"` (every installed one) or `"none"`.
        num_workers (`int`, *optional*, defaults to 0): DataLoader workers per task.
        find_unused_parameters (`bool`, *optional*): DDP's flag; by default on exactly when the mixing strategy
            can leave a task (hence its head) out of a step, or when every task has a dense head (which leaves the
            backbone's final norm unused).
        usage_ema_decay (`float`, *optional*, defaults to 0.99): decay of the per-task expert-usage EMA.
        save_final_model (`bool`, *optional*, defaults to `True`): write `final/` with `save_pretrained`.
        max_minutes (`float`, *optional*): wall-clock budget of the training steps (this run's, after a resume).
            After the first steps the schedule is fitted to the steps the budget holds, and training stops before
            a step would end past it; evaluation and saving follow as for a finished run (see
            `modsquad.training.budget`).
        max_bad_rows (`int`, *optional*, defaults to 100): training rows of one task that may be skipped because
            they cannot be read or cannot be right (an image that does not decode or is empty, non-finite pixels,
            annotations out of range); each is replaced by the next readable row and reported with its row index.
            One more stops the run with the first errors. `0` makes every bad row fatal. Ten bad rows in a row stop
            the run at once (the dataset or its options are wrong, not a row).
        one_task_at_a_time (`bool`, *optional*, defaults to `False`): run each task micro-batch's forward and
            backward on its own (gradients accumulate, the optimizer steps once per step), so that the activations
            of one task batch are alive at a time instead of those of every task of the step. Needs
            `optimization.mi_estimator: streaming`.
    """

    max_steps: int | None = None
    num_epochs: float = 1.0
    gradient_accumulation_steps: int | None = None
    mixed_precision: str | None = None
    cpu: bool = False
    log_every: int = 10
    eval_every: int = 0
    eval_at_end: bool = True
    save_every: int = 0
    keep_last: int = 2
    tracker: str | list[str] = "csv"
    num_workers: int = 0
    find_unused_parameters: bool | None = None
    usage_ema_decay: float = 0.99
    save_final_model: bool = True
    max_minutes: float | None = None
    max_bad_rows: int = 100
    one_task_at_a_time: bool = False

    def __post_init__(self):
        check_number(
            "training.max_minutes", self.max_minutes, minimum=0, exclusive_minimum=True, optional=True
        )
        check_number("training.max_steps", self.max_steps, minimum=1, integer=True, optional=True)
        check_number("training.num_epochs", self.num_epochs, minimum=0, exclusive_minimum=True)
        # gradient_accumulation_steps may be left unset: the launcher's setting wins then.
        check_number(
            "training.gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            minimum=1,
            integer=True,
            optional=True,
        )
        for key in ("log_every", "keep_last"):
            check_number(f"training.{key}", getattr(self, key), minimum=1, integer=True)
        for key in ("eval_every", "save_every", "num_workers", "max_bad_rows"):
            check_number(f"training.{key}", getattr(self, key), minimum=0, integer=True)
        for key in ("cpu", "eval_at_end", "save_final_model", "one_task_at_a_time"):
            check_bool(f"training.{key}", getattr(self, key))
        if self.find_unused_parameters is not None:
            check_bool("training.find_unused_parameters", self.find_unused_parameters)
        if self.one_task_at_a_time and self.find_unused_parameters is False:
            raise ValueError(
                "training.find_unused_parameters=false contradicts one_task_at_a_time=true: each forward leaves the "
                "other tasks' heads unused; accepted: true or null"
            )
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"training.mixed_precision={self.mixed_precision!r}; accepted: {list(MIXED_PRECISIONS)} (or leave "
                "it unset: the launcher's setting)"
            )
        check_tracker_names(self.tracker)
        check_number(
            "training.usage_ema_decay", self.usage_ema_decay, minimum=0, maximum=1, exclusive_maximum=True
        )


@dataclass
class TrainingRecipe:
    r"""
    A whole multi-task training run.

    Args:
        tasks (`list[TaskRecipe]`): the tasks, in task-id order.
        output_dir (`str`, *optional*, defaults to `"runs/modsquad"`): run folder (checkpoints, logs, final model).
        seed (`int`, *optional*, defaults to 0): seed of the model init, the data order and the task draws.
        model, mixing, optimization, training: the sections above.
        resume (`str`, *optional*): checkpoint folder to resume from, or `"latest"` (newest in `output_dir`). The
            checkpoint is verified first (every file's SHA-256); the recipe may differ from the one it was taken with
            only in `RESUMABLE_KEYS` (length, logging, evaluation, checkpointing), other changes are refused.
        overwrite (`bool`, *optional*, defaults to `False`): start afresh in an `output_dir` that already holds a run,
            deleting that run's checkpoints, logs and final model first. Without it (or `resume`) such a folder is
            refused, so that a run is never mixed with or silently replaced by another.
    """

    tasks: list[TaskRecipe]
    output_dir: str = "runs/modsquad"
    seed: int = 0
    model: ModelRecipe = field(default_factory=ModelRecipe)
    mixing: MixingRecipe = field(default_factory=MixingRecipe)
    optimization: OptimizationRecipe = field(default_factory=OptimizationRecipe)
    training: LoopRecipe = field(default_factory=LoopRecipe)
    resume: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("a recipe needs at least one task under `tasks`")
        # numpy seeds its generators with 32-bit unsigned ints.
        check_number("seed", self.seed, minimum=0, maximum=2**32 - 1, integer=True)
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError(f"output_dir must be a folder path, got {self.output_dir!r}")
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume.strip()):
            raise ValueError(f"resume must be 'latest' or a checkpoint folder, got {self.resume!r}")
        check_bool("overwrite", self.overwrite)
        if self.overwrite and self.resume is not None:
            raise ValueError(
                f"overwrite=true and resume={self.resume!r} contradict each other: resume continues the run in "
                f"{self.output_dir!r}, overwrite deletes it; pass one of them"
            )
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
        scalars = ("output_dir", "seed", "resume", "overwrite")
        reject_unknown_keys(data, ["tasks", *scalars, *sections], "recipe")
        for key, value in data.items():
            if key in sections:
                kwargs[key] = _build(sections[key], value or {}, key)
            else:
                kwargs[key] = value
        return cls(**kwargs)


def _build(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"recipe section {where} must be a mapping, got {values!r}")
    if cls is TaskRecipe and isinstance(values.get("name"), str):
        where = f"tasks.{values['name']}"
    reject_unknown_keys(values, [f.name for f in dataclasses.fields(cls)], where)
    if cls is TaskRecipe and "name" not in values:
        raise ValueError(f"{where} needs a `name`")
    return cls(**values)


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


# Recipe keys whose change a resumed run honours (`*` matches a task name); the checkpoint fixes every other one.
# The loop's length, logging, evaluation and checkpointing can change; what the optimizer state, the data order and
# the model depend on cannot.
RESUMABLE_KEYS = (
    "output_dir",
    "resume",
    "overwrite",
    "training.max_steps",
    "training.num_epochs",
    "training.log_every",
    "training.eval_every",
    "training.eval_at_end",
    "training.save_every",
    "training.keep_last",
    "training.tracker",
    "training.num_workers",
    "training.cpu",
    "training.find_unused_parameters",
    "training.save_final_model",
    "training.max_bad_rows",
    "tasks.*.eval_split",
    "tasks.*.eval_batch_size",
    "tasks.*.max_eval_samples",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A recipe dict as `{dotted.key: value}`; the task list is keyed by task name (`tasks.<name>.<key>`)."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, child in value.items():
            flat.update(_flatten(child, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    if (
        prefix == "tasks"
        and isinstance(value, list)
        and all(isinstance(t, dict) and "name" in t for t in value)
    ):
        flat = {"tasks": [t["name"] for t in value]}
        for task in value:
            flat.update(_flatten({k: v for k, v in task.items() if k != "name"}, f"tasks.{task['name']}"))
        return flat
    return {prefix: value}


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What changed between the recipe a checkpoint was taken with and the recipe of the run resuming it.

    Args:
        saved (`dict`): `TrainingRecipe.to_dict()` of the run that wrote the checkpoint.
        current (`dict`): `TrainingRecipe.to_dict()` of the resuming run.

    Returns:
        `(honoured, refused)`: lines `key: old -> new`, split by whether `RESUMABLE_KEYS` allows the change.
    """
    # Through JSON, so tuples and lists (and int and float spellings of one number) compare alike.
    old, new = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    honoured, refused = [], []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "<unset>"), new.get(key, "<unset>")
        if before == after:
            continue
        line = f"{key}: {before!r} -> {after!r}"
        resumable = any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)
        (honoured if resumable else refused).append(line)
    return honoured, refused


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
            state = "is a folder, not a YAML file" if Path(path).is_dir() else "does not exist"
            raise ValueError(f"recipe file {str(path)!r} {state}")
        raw = parse_yaml(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"recipe file {str(path)!r} must hold a mapping at the top level")
    raw.update(data)
    apply_overrides(raw, list(overrides or []))
    missing = required_values(raw)
    if missing:
        source = f"{str(path)!r}" if path is not None else "the recipe"
        raise ValueError(
            f"{source} leaves {missing} to be given ({REQUIRED}); pass each as an override, e.g. "
            f"{missing[0]}=<value> after `modsquad train --config ...`"
        )
    return TrainingRecipe.from_dict(raw)


def required_values(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys of a raw recipe whose value is still `???` (tasks named by their `name`)."""
    if isinstance(node, dict):
        found = []
        for key, value in node.items():
            found += required_values(value, f"{prefix}.{key}" if prefix else str(key))
        return found
    if isinstance(node, list):
        found = []
        for index, item in enumerate(node):
            name = item.get("name", index) if isinstance(item, dict) else index
            found += required_values(item, f"{prefix}.{name}")
        return found
    return [prefix] if node == REQUIRED else []


__all__ = [
    "RESUMABLE_KEYS",
    "LoopRecipe",
    "MixingRecipe",
    "ModelRecipe",
    "OptimizationRecipe",
    "TaskRecipe",
    "TrainingRecipe",
    "apply_overrides",
    "load_recipe",
    "recipe_changes",
    "required_values",
]
