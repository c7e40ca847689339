"""What every task head shares: the `TaskHead` contract, the registry of head types, and the generic single-task
model (`ModSquadForTask`) that the `ModSquadFor<Type>` classes specialise.

A head module turns the backbone output of one task batch into predictions, computes its own loss (the stock
Transformers losses do not fit: detection would get DETR's Hungarian loss, depth a causal-LM loss) and packs the
standard Transformers output class that pipelines expect. Single-task models and the multi-task model store head
`t` under `heads.<t>`, so their weights are interchangeable.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers.modeling_outputs import ModelOutput

from .configuration_modsquad import ModSquadConfig
from .modeling_modsquad import ModSquadModel, ModSquadModelOutput, ModSquadPreTrainedModel


class TaskHead(nn.Module, ABC):
    """Base class of task heads.

    A head class carries the facts of its task type, which the rest of the package reads from it rather than from
    tables of its own: `task_type` (the config's `type`), `auto_class` (the name of the Transformers Auto class that
    loads its single-task model), `pipeline_tag` (the Hub pipeline tag of its models), `metrics` (the evaluation
    metrics it is judged by, headline first, then the second one reports show) and, set when its single-task model
    class is defined, `model_class`. Subclasses also set `needs_hidden_states` (dense heads read the outputs of
    `config.feature_layers`) and implement `forward`, `loss` (the task's own loss) and `build_output`.

    Args:
        config ([`ModSquadConfig`]): model configuration.
        task (`dict`): the task entry of `config.tasks` this head serves.
    """

    task_type: str = ""
    auto_class: str = ""
    pipeline_tag: str = ""
    metrics: tuple[str, ...] = ()
    model_class: type[ModSquadForTask] | None = None
    needs_hidden_states: bool = False

    def __init__(self, config: ModSquadConfig, task: dict):
        super().__init__()
        self.task_name = task["name"]

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
    """The routing fields every ModSquad head output carries."""
    return {
        "aux_loss": backbone_output.aux_loss,
        "router_logits": backbone_output.router_logits,
        "router_probs": backbone_output.router_probs,
        "expert_indices": backbone_output.expert_indices,
    }


def resolve_head_task(config: ModSquadConfig, task_type: str, task: str | int | None) -> str:
    """The task a single-task model serves: the one named, else the only task of `task_type` in the config."""
    candidates = config.tasks_of_type(task_type)
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


class ModSquadForTask(ModSquadPreTrainedModel):
    """Backbone plus the head of one task of the config; subclasses set `head_class`, which fixes the task type.

    Args:
        config ([`ModSquadConfig`]): model configuration (may hold other tasks too: a multi-task checkpoint).
        task (`str`, *optional*): the task to serve; needed only when the config has several tasks of this type.
            `from_pretrained(path, task="seg")` passes it through.
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
        super().__init__(config)
        self.task = resolve_head_task(config, self.task_type, task)
        entry = config.get_task(self.task)
        if "id2label" in entry:
            # Pipelines read the labels (and the classification loss type) from the top-level config.
            config.id2label = dict(entry["id2label"])
            config.label2id = dict(entry["label2id"])
        if "problem_type" in entry:
            config.problem_type = entry["problem_type"]
        # Heads of the other tasks of a multi-task checkpoint are expected leftovers, not loading problems.
        self._keys_to_ignore_on_load_unexpected = [rf"^heads\.(?!{re.escape(self.task)}\.)"]
        self.modsquad = ModSquadModel(config)
        self.heads = nn.ModuleDict({self.task: build_task_head(config, entry)})
        self.post_init()

    @property
    def head(self) -> TaskHead:
        return self.heads[self.task]

    def _remote_code_classes(self) -> dict[str, type]:
        return {**super()._remote_code_classes(), self.head_class.auto_class: type(self)}

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels=None,
        task: str | int | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): images.
            labels (*optional*): targets in the format of the task type (see the head class); the returned `loss`
                includes the backbone's per-batch `aux_loss`.
            task (`str`, *optional*): must be this model's task if given.
            output_hidden_states (`bool`, *optional*): also return every block's output.
            return_dict (`bool`, *optional*): return the output dataclass rather than a tuple.
        """
        if task is not None and self.config.get_task(task)["name"] != self.task:
            raise ValueError(f"this model serves task {self.task!r}, got task={task!r}")
        return run_task_head(
            self.modsquad, self.head, pixel_values, labels, output_hidden_states, return_dict
        )


def run_task_head(
    backbone: ModSquadModel,
    head: TaskHead,
    pixel_values: torch.Tensor,
    labels,
    output_hidden_states: bool | None,
    return_dict: bool | None,
):
    """One task batch through backbone and head: predictions, loss (task + aux) when labels are given, output."""
    return_dict = return_dict if return_dict is not None else backbone.config.return_dict
    backbone_output = backbone(
        pixel_values,
        task=head.task_name,
        output_hidden_states=bool(output_hidden_states) or head.needs_hidden_states,
        return_dict=True,
    )
    predictions = head(backbone_output, pixel_values)
    loss = None
    if labels is not None:
        loss = head.loss(predictions, labels)
        if backbone_output.aux_loss is not None:
            loss = loss + backbone_output.aux_loss
    if not output_hidden_states:
        backbone_output.hidden_states = None
    output = head.build_output(loss, predictions, backbone_output)
    return output if return_dict else output.to_tuple()


__all__ = [
    "TASK_HEADS",
    "ModSquadForTask",
    "TaskHead",
    "build_task_head",
    "register_task_head",
    "resolve_head_task",
    "routing_fields",
    "run_task_head",
    "task_head_class",
]
