"""modsquad: a multi-task mixture-of-experts vision transformer for Hugging Face Transformers.

Importing the package registers the config, the models and the image processor with the Transformers Auto classes
([`register_auto_classes`]); which Auto class serves which task type is read from the task heads
(`TaskHead.auto_class`), the one place that says it. Public names are imported from the module that defines them
when first used, so that the tools around the model (training, pruning, adaptation) cost nothing until then.

The `modsquad` command is the one exception to registering on import: it must answer `--help` without loading torch,
so when this interpreter runs that command the model stack loads only once a sub-command needs it.
"""

from __future__ import annotations

import importlib
import os
import sys

__version__ = "0.1.0"

# Public name -> the module that defines it (relative to this package).
_PUBLIC_NAMES = {
    "TASK_TYPES": ".model.configuration_modsquad",
    "ModSquadConfig": ".model.configuration_modsquad",
    "ModSquadModel": ".model.modeling_modsquad",
    "ModSquadModelOutput": ".model.modeling_modsquad",
    "ModSquadPreTrainedModel": ".model.modeling_modsquad",
    "SORTED_MM": ".model.sorted_mm",
    "task_expert_mutual_information": ".model.moe",
    "TASK_HEADS": ".model.modeling_heads",
    "TaskHead": ".model.modeling_heads",
    "ModSquadForTask": ".model.modeling_heads",
    "ModSquadForImageClassification": ".model.head_classification",
    "ModSquadImageClassifierOutput": ".model.head_classification",
    "ModSquadForSemanticSegmentation": ".model.head_segmentation",
    "ModSquadSemanticSegmenterOutput": ".model.head_segmentation",
    "ModSquadForObjectDetection": ".model.head_detection",
    "ModSquadObjectDetectionOutput": ".model.head_detection",
    "ModSquadForDepthEstimation": ".model.head_depth",
    "ModSquadDepthEstimatorOutput": ".model.head_depth",
    "ModSquadForMultiTask": ".model.modeling_multitask",
    "ModSquadImageProcessor": ".model.image_processing_modsquad",
    "RoutingStatistics": ".training.step",
    "ExpertUsage": ".pruning.usage",
    "ExpertUsageTracker": ".pruning.usage",
    "collect_expert_usage": ".pruning.usage",
    "compare_pruned_outputs": ".pruning.prune",
    "prune_for_task": ".pruning.prune",
    "prune_run": ".pruning.run",
    "add_task": ".adaptation.continual",
    "merge_added_task": ".adaptation.continual",
}

_registered = False


def register_auto_classes() -> None:
    """Registers `ModSquadConfig`, `ModSquadModel`, the single-task model of every task type (with the Auto class its
    head names), `ModSquadForMultiTask` (with `AutoModelForPreTraining`) and `ModSquadImageProcessor` with the
    Transformers Auto classes. Idempotent; importing the package
    calls it."""
    global _registered
    if _registered:
        return
    import transformers
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    from .model.configuration_modsquad import ModSquadConfig
    from .model.image_processing_modsquad import ModSquadImageProcessor
    from .model.modeling_heads import TASK_HEADS
    from .model.modeling_modsquad import ModSquadModel
    from .model.modeling_multitask import MULTITASK_AUTO_CLASS, ModSquadForMultiTask  # (imports every head)

    transformers.AutoConfig.register(ModSquadConfig.model_type, ModSquadConfig, exist_ok=True)
    transformers.AutoModel.register(ModSquadConfig, ModSquadModel, exist_ok=True)
    for head in TASK_HEADS.values():
        getattr(transformers, head.auto_class).register(ModSquadConfig, head.model_class, exist_ok=True)
    getattr(transformers, MULTITASK_AUTO_CLASS).register(ModSquadConfig, ModSquadForMultiTask, exist_ok=True)
    transformers.AutoImageProcessor.register(
        ModSquadConfig, image_processor_classes={"pil": ModSquadImageProcessor}, exist_ok=True
    )
    # No video processor: declared, so that `AutoVideoProcessor` (which pipelines try on every model folder) answers
    # "none" instead of guessing a remote `ModSquadVideoProcessor` from the image processor's auto_map and asking
    # whether to run custom code. Taken from its module: the top-level name is a placeholder without torchvision.
    AutoVideoProcessor.register(ModSquadConfig, video_processor_classes={}, exist_ok=True)
    _registered = True


def _running_the_command() -> bool:
    """Whether this interpreter was started as the `modsquad` command (its console script)."""
    return bool(sys.argv) and os.path.splitext(os.path.basename(sys.argv[0]))[0] == "modsquad"


def __getattr__(name: str):
    if name not in _PUBLIC_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(_PUBLIC_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC_NAMES})


if not _running_the_command():
    register_auto_classes()

__all__ = ["register_auto_classes", *sorted(_PUBLIC_NAMES)]
