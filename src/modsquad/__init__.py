"""modsquad: a multi-task mixture-of-experts vision transformer for Hugging Face Transformers.

Importing the package registers the config, models and image processor with the Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
)

from .configuration_modsquad import TASK_TYPES, ModSquadConfig
from .continual import add_task, merge_added_task
from .expert_usage import ExpertUsage, ExpertUsageTracker, collect_expert_usage
from .head_classification import ModSquadForImageClassification, ModSquadImageClassifierOutput
from .head_depth import ModSquadDepthEstimatorOutput, ModSquadForDepthEstimation
from .head_detection import ModSquadForObjectDetection, ModSquadObjectDetectionOutput
from .head_segmentation import ModSquadForSemanticSegmentation, ModSquadSemanticSegmenterOutput
from .image_processing_modsquad import ModSquadImageProcessor
from .modeling_heads import ModSquadForTask, TaskHead
from .modeling_modsquad import ModSquadModel, ModSquadModelOutput, ModSquadPreTrainedModel
from .modeling_multitask import ModSquadForMultiTask
from .moe import SORTED_MM, RoutingStatistics, task_expert_mutual_information
from .pruning import compare_pruned_outputs, prune_for_task
from .run_pruning import prune_run

__version__ = "0.1.0"

AutoConfig.register(ModSquadConfig.model_type, ModSquadConfig, exist_ok=True)
AutoModel.register(ModSquadConfig, ModSquadModel, exist_ok=True)
AutoModelForImageClassification.register(ModSquadConfig, ModSquadForImageClassification, exist_ok=True)
AutoModelForObjectDetection.register(ModSquadConfig, ModSquadForObjectDetection, exist_ok=True)
AutoModelForSemanticSegmentation.register(ModSquadConfig, ModSquadForSemanticSegmentation, exist_ok=True)
AutoModelForDepthEstimation.register(ModSquadConfig, ModSquadForDepthEstimation, exist_ok=True)
AutoImageProcessor.register(
    ModSquadConfig, image_processor_classes={"pil": ModSquadImageProcessor}, exist_ok=True
)

__all__ = [
    "SORTED_MM",
    "TASK_TYPES",
    "ExpertUsage",
    "ExpertUsageTracker",
    "ModSquadConfig",
    "ModSquadDepthEstimatorOutput",
    "ModSquadForDepthEstimation",
    "ModSquadForImageClassification",
    "ModSquadForMultiTask",
    "ModSquadForObjectDetection",
    "ModSquadForSemanticSegmentation",
    "ModSquadForTask",
    "ModSquadImageClassifierOutput",
    "ModSquadImageProcessor",
    "ModSquadModel",
    "ModSquadModelOutput",
    "ModSquadObjectDetectionOutput",
    "ModSquadPreTrainedModel",
    "ModSquadSemanticSegmenterOutput",
    "RoutingStatistics",
    "TaskHead",
    "add_task",
    "collect_expert_usage",
    "compare_pruned_outputs",
    "merge_added_task",
    "prune_for_task",
    "prune_run",
    "task_expert_mutual_information",
]
