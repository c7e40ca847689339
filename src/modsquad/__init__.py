"""modsquad: a multi-task mixture-of-experts vision transformer for Hugging Face Transformers.

Importing the package registers the config, models and image processor with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .configuration_modsquad import TASK_TYPES, ModSquadConfig
from .head_classification import ModSquadForImageClassification, ModSquadImageClassifierOutput
from .image_processing_modsquad import ModSquadImageProcessor
from .modeling_heads import ModSquadForTask, TaskHead
from .modeling_modsquad import ModSquadModel, ModSquadModelOutput, ModSquadPreTrainedModel
from .modeling_multitask import ModSquadForMultiTask
from .moe import SORTED_MM, RoutingStatistics, task_expert_mutual_information

__version__ = "0.1.0"

AutoConfig.register(ModSquadConfig.model_type, ModSquadConfig, exist_ok=True)
AutoModel.register(ModSquadConfig, ModSquadModel, exist_ok=True)
AutoModelForImageClassification.register(ModSquadConfig, ModSquadForImageClassification, exist_ok=True)
AutoImageProcessor.register(
    ModSquadConfig, image_processor_classes={"pil": ModSquadImageProcessor}, exist_ok=True
)

__all__ = [
    "SORTED_MM",
    "TASK_TYPES",
    "ModSquadConfig",
    "ModSquadForImageClassification",
    "ModSquadForMultiTask",
    "ModSquadForTask",
    "ModSquadImageClassifierOutput",
    "ModSquadImageProcessor",
    "ModSquadModel",
    "ModSquadModelOutput",
    "ModSquadPreTrainedModel",
    "RoutingStatistics",
    "TaskHead",
    "task_expert_mutual_information",
]
