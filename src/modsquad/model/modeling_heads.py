"""What every task head shares: the `TaskHead` contract, the registry of head types, and the generic single-task
model (`ModSquadForTask`) that the `ModSquadFor<Type>` classes specialise.

A head module turns the backbone output of one task batch into predictions, computes its own loss (the stock
Transformers losses do not fit: detection would get DETR's Hungarian loss, depth a causal-LM loss) and packs the
standard Transformers output class that pipelines expect. Single-task models and the multi-task model store head
`t` under `heads.<t>`, so their weights are interchangeable.
"""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_modsquad import ModSquadConfig, _normalise_task
from .feature_pyramid import superseded_norm_patterns
from .modeling_modsquad import (
    ModSquadModel,
    ModSquadModelOutput,
    ModSquadPreTrainedModel,
    hidden_states_request,
    keep_requested_hidden_states,
)


class TaskHead(nn.Module, ABC):
    """Base class of task heads.

    A head class carries the facts of its task type, which the rest of the package reads from it rather than from
    tables of its own: `task_type` (the config's `type`), `auto_class` (the name of the Transformers Auto class that
    loads its single-task model), `pipeline_tag` (the Hub pipeline tag of its models), `metrics` (the evaluation
    metrics it is judged by, headline first, then the second one reports show) and, set when its single-task model
    class is defined, `model_class`. Dense heads set `hidden_state_indices`, the entries of the backbone's
    `hidden_states` they read (see [`feature_pyramid.feature_hidden_state_indices`]). Subclasses implement
    `forward`, `loss` (the task's own loss) and `build_output`.

    Args:
        config ([`ModSquadConfig`]): model configuration.
        task (`dict`): the task entry of `config.tasks` this head serves.
    """

    task_type: str = ""
    auto_class: str = ""
    pipeline_tag: str = ""
    metrics: tuple[str, ...] = ()
    model_class: type[ModSquadForTask] | None = None

    def __init__(self, config: ModSquadConfig, task: dict):
        super().__init__()
        self.task_name = task["name"]
        self.hidden_state_indices: list[int] = []

    @abstractmethod
    def forward(self, backbone_output: ModSquadModelOutput, pixel_values: torch.Tensor):
        """Predictions of one batch (a tensor or a dict of tensors)."""

    @abstractmethod
    def loss(self, predictions, labels) -> torch.Tensor:
        """Task loss; validates `labels` and raises a ValueError naming what is wrong."""

    def loss_count(self, labels) -> torch.Tensor:
        """What the loss of a batch with `labels` averages over: the loss is `sum / max(count, 1)` (0 when a dense
        head has nothing labelled). Data-parallel training rescales each process's loss by
        `max(local count, 1) * world_size / max(global count, 1)` so that its gradient is that of the global batch.
        Images, by default; dense and detection heads override it."""
        return torch.tensor(float(len(labels)))

    @abstractmethod
    def build_output(self, loss, predictions, backbone_output: ModSquadModelOutput) -> ModelOutput:
        """The stock Transformers output of this task type (plus routing fields)."""


# task type -> TaskHead subclass; filled by the head modules when imported.
TASK_HEADS: dict[str, type[TaskHead]] = {}


def register_task_head(head_class: type[TaskHead]) -> type[TaskHead]:
    """Class decorator: makes `head_class` the head of its `task_type`."""
    TASK_HEADS[head_class.task_type] = head_class
    return head_class


def task_head_class(task_type: str) -> type[TaskHead]:
    """The head class of a task type (and with it the type's Auto class, pipeline tag, metrics and model class)."""
    if task_type not in TASK_HEADS:
        raise ValueError(
            f"no head is registered for task type {task_type!r}; registered: {sorted(TASK_HEADS)}"
        )
    return TASK_HEADS[task_type]


def build_task_head(config: ModSquadConfig, task: dict) -> TaskHead:
    return task_head_class(task["type"])(config, task)


def routing_fields(backbone_output: ModSquadModelOutput) -> dict:
    """The routing fields every ModSquad head output carries (set with `output_router_logits=True`)."""
    return {
        "aux_loss": backbone_output.aux_loss,
        "router_logits": backbone_output.router_logits,
        "router_probs": backbone_output.router_probs,
        "expert_indices": backbone_output.expert_indices,
    }


def resolve_head_task(config: ModSquadConfig, task_type: str, task: str | int | None) -> str:
    """The task a single-task model serves: the one named, else the config's `head_task` (the task of the model the
    config was saved from) if it has this type, else the only task of `task_type` in the config."""
    candidates = config.tasks_of_type(task_type)
    if (
        task is None
        and config.head_task is not None
        and config.get_task(config.head_task)["type"] == task_type
    ):
        task = config.head_task
    if task is not None:
        entry = config.get_task(task)
        if entry["type"] != task_type:
            raise ValueError(
                f"task {entry['name']!r} is a {entry['type']} task; this model serves {task_type} "
                f"(tasks of that type here: {candidates})"
            )
        return entry["name"]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"the config has no {task_type} task; its tasks are {config.task_names}")
    raise ValueError(f"the config has several {task_type} tasks {candidates}; pass task=<name> to pick one")


def served_task_entry(config: ModSquadConfig, name: str) -> dict:
    """The entry of task `name` as a single-task model serves it: the config's top-level `id2label` (`num_labels`)
    and, for classification, `problem_type` replace the entry's when they belong to it, i.e. when it is the config's
    only labelled task or the config names no other `head_task`. That is how a caller relabels the task with
    `config.num_labels = ...` or `from_pretrained(path, num_labels=...)`, as for any Transformers model."""
    entry = dict(config.get_task(name))
    if "id2label" not in entry:
        return entry
    labelled = [t["name"] for t in config.tasks if "id2label" in t]
    if labelled != [name] and config.head_task not in (None, name):
        return entry
    if config.id2label is not None:
        id2label = {int(k): str(v) for k, v in config.id2label.items()}
        if id2label != entry["id2label"]:
            entry = {k: v for k, v in entry.items() if k not in ("id2label", "label2id", "num_labels")}
            entry["id2label"] = id2label
    if entry["type"] == "image-classification" and config.problem_type is not None:
        entry["problem_type"] = config.problem_type
    return _normalise_task(entry, config.task_index(name))


class ModSquadForTask(ModSquadPreTrainedModel):
    """Backbone plus the head of one task of the config; subclasses set `head_class`, which fixes the task type.

    The model works on a copy of `config`, written for the task it serves (see [`served_task_entry`]): the task's
    labels and `problem_type` at the top level, where pipelines and `Trainer` read them, and `head_task`, so that
    what `save_pretrained` writes loads back into the same model. The caller's config is not changed.

    Args:
        config ([`ModSquadConfig`]): model configuration (may hold other tasks too: a multi-task checkpoint).
        task (`str`, *optional*): the task to serve; needed only when the config has several tasks of this type
            and names none in `head_task`. `from_pretrained(path, task="seg")` passes it through.
    """

    head_class: type[TaskHead] | None = None
    task_type: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # A `ModSquadFor<Type>` names its head; the head learns which model class serves its type.
        if "head_class" in cls.__dict__:
            cls.task_type = cls.head_class.task_type
            cls.head_class.model_class = cls

    def __init__(self, config: ModSquadConfig, task: str | None = None):
        # The model keeps a config of its own, written for the task it serves; the caller's is left as it was.
        config = copy.deepcopy(config)
        name = resolve_head_task(config, self.task_type, task)
        entry = served_task_entry(config, name)
        config.tasks[config.task_index(name)] = entry
        if "id2label" in entry:
            # Pipelines read the labels (and the classification loss type) from the top-level config.
            config.id2label = dict(entry["id2label"])
            config.label2id = dict(entry["label2id"])
        if "problem_type" in entry:
            config.problem_type = entry["problem_type"]
        # Saved with the model, so that a config with several tasks of this type loads back into the same model.
        config.head_task = name
        super().__init__(config)
        self.task = name
        self.modsquad = ModSquadModel(config)
        self.heads = nn.ModuleDict({self.task: build_task_head(config, entry)})
        self.post_init()
        # Heads of the other tasks of a multi-task checkpoint are expected leftovers, not loading problems. Set after
        # `post_init`, which adds the backbone's own pattern (`^heads\.`, for loading the backbone alone) unprefixed:
        # it would hide every problem with this model's head weights.
        self._keys_to_ignore_on_load_unexpected = {
            rf"^heads\.(?!{re.escape(self.task)}\.)",
            *superseded_norm_patterns(self),
        }

    @property
    def head(self) -> TaskHead:
        return self.heads[self.task]

    def _remote_code_classes(self) -> dict[str, type]:
        return {**super()._remote_code_classes(), self.head_class.auto_class: type(self)}

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels=None,
        task: str | int | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): images.
            labels (*optional*): targets in the format of the task type (see the head class).
            task (`str`, *optional*): must be this model's task if given.
            output_router_logits (`bool`, *optional*): also return the routing tensors and the router losses, and
                add `aux_loss` to the returned `loss`; defaults to `config.output_router_logits`.
            output_hidden_states (`bool` or `list[int]`, *optional*): also return every block's output.
            output_attentions (`bool`, *optional*): also return the attention probabilities (eager attention).
            return_dict (`bool`, *optional*): return the output dataclass rather than a tuple.
        """
        if task is not None and self.config.get_task(task)["name"] != self.task:
            raise ValueError(f"this model serves task {self.task!r}, got task={task!r}")
        return run_task_head(
            self.modsquad,
            self.head,
            pixel_values,
            labels,
            output_router_logits=output_router_logits,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )


def run_task_head(
    backbone: ModSquadModel,
    head: TaskHead,
    pixel_values: torch.Tensor,
    labels,
    output_router_logits: bool | None = None,
    output_hidden_states: bool | int | list[int] | None = None,
    output_attentions: bool | None = None,
    **kwargs,
) -> ModelOutput:
    """One task batch through backbone and head: predictions, loss when labels are given (plus the router losses with
    `output_router_logits`), the head's output class."""
    config = backbone.config
    if output_router_logits is None:
        output_router_logits = config.output_router_logits
    if output_hidden_states is None:
        output_hidden_states = config.output_hidden_states
    if output_attentions is not None:
        kwargs["output_attentions"] = output_attentions
    backbone_output = backbone(
        pixel_values,
        task=head.task_name,
        output_router_logits=output_router_logits,
        output_hidden_states=hidden_states_request(backbone, output_hidden_states, head.hidden_state_indices),
        return_dict=True,
        **kwargs,
    )
    predictions = head(backbone_output, pixel_values)
    loss = None
    if labels is not None:
        loss = head.loss(predictions, labels)
        if backbone_output.aux_loss is not None:
            loss = loss + backbone_output.aux_loss
    backbone_output.hidden_states = keep_requested_hidden_states(
        backbone, backbone_output.hidden_states, output_hidden_states
    )
    return head.build_output(loss, predictions, backbone_output)


__all__ = [
    "TASK_HEADS",
    "ModSquadForTask",
    "TaskHead",
    "build_task_head",
    "register_task_head",
    "resolve_head_task",
    "routing_fields",
    "run_task_head",
    "served_task_entry",
    "task_head_class",
]
