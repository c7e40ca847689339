"""The multi-task model: one backbone, the head of every task of the config."""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils.generic import can_return_tuple

from .configuration_modsquad import ModSquadConfig
from .feature_pyramid import superseded_norm_patterns

# Each head module registers its task head. Imported as `from .module import name`: the form Transformers follows
# when it copies remote code, so that these modules travel with a multi-task checkpoint.
from .head_classification import ModSquadForImageClassification  # noqa: F401
from .head_depth import ModSquadForDepthEstimation  # noqa: F401
from .head_detection import ModSquadForObjectDetection  # noqa: F401
from .head_segmentation import ModSquadForSemanticSegmentation  # noqa: F401
from .modeling_heads import build_task_head, run_task_head, task_head_class
from .modeling_modsquad import ModSquadModel, ModSquadPreTrainedModel

# The Auto class of the multi-task model: like `BertForPreTraining`, which holds the heads of every objective BERT is
# trained on, it is the model trained with the objectives of all tasks. Registered with it when the package is
# imported, and written in the `auto_map` of its checkpoints for `trust_remote_code=True` without the package.
MULTITASK_AUTO_CLASS = "AutoModelForPreTraining"


class ModSquadForMultiTask(ModSquadPreTrainedModel):
    """Mod-Squad backbone with the head of every task in `config.tasks`; each call runs one task's batch.

    Weights are stored as `modsquad.*` (backbone) and `heads.<task>.*`, exactly as in the single-task classes, so
    `ModSquadFor<Type>.from_pretrained(multi_task_folder, task="<task>")` loads one task out of it.

    Args:
        config ([`ModSquadConfig`]): model configuration.

    Example:

    ```python
    >>> model = ModSquadForMultiTask(config)
    >>> seg_out = model(pixel_values, task="seg", labels=seg_maps)  # SemanticSegmenterOutput
    >>> cls_out = model(pixel_values, task="cls", labels=class_ids)  # ImageClassifierOutput
    ```"""

    def __init__(self, config: ModSquadConfig):
        super().__init__(config)
        self.modsquad = ModSquadModel(config)
        self.heads = nn.ModuleDict({entry["name"]: build_task_head(config, entry) for entry in config.tasks})
        self.post_init()
        # `post_init` adds the backbone's pattern for loading it alone (`^heads\.`) unprefixed; here it would hide
        # every problem with the heads' weights.
        self._keys_to_ignore_on_load_unexpected = superseded_norm_patterns(self)

    def _remote_code_classes(self) -> dict[str, type]:
        # Also reachable without the package: `AutoModelForPreTraining.from_pretrained(path, trust_remote_code=True)`
        # (see `MULTITASK_AUTO_CLASS`).
        classes = {**super()._remote_code_classes(), MULTITASK_AUTO_CLASS: ModSquadForMultiTask}
        for entry in self.config.tasks:
            head = task_head_class(entry["type"])
            classes[head.auto_class] = head.model_class
        return classes

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        task: str | int,
        labels=None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | int | list[int] | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ):
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): images of one task.
            task (`str` or `int`): the task of this batch (name or id).
            labels (*optional*): that task's targets, in the format of its head.
            output_router_logits (`bool`, *optional*): also return the routing tensors and router losses (and add
                `aux_loss` to `loss`); defaults to `config.output_router_logits`. The multi-task training step asks
                for them.
            output_hidden_states, output_attentions, return_dict: as for the single-task models.

        Returns:
            The output class of the task's type (e.g. [`ModSquadImageClassifierOutput`]).
        """
        head = self.heads[self.config.get_task(task)["name"]]
        return run_task_head(
            self.modsquad,
            head,
            pixel_values,
            labels,
            output_router_logits=output_router_logits,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )


__all__ = ["MULTITASK_AUTO_CLASS", "ModSquadForMultiTask"]
