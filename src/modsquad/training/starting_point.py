"""Where a recipe's model starts, read before any data is loaded or weight is copied: from scratch, from a ModSquad
checkpoint (`model.pretrained` with model type `modsquad`), or from a dense ViT / DeiT / DINOv2 checkpoint that is
upcycled (`model.pretrained` with model type `vit`, `deit` or `dinov2`).

A checkpoint decides how images are fed: its image processor's mean, std and resampling, its patch size, and the
default training resolution (the processor's crop or resize size), so no recipe copies those numbers by hand. Every
error a recipe can make about its starting point (a missing folder, a wrong Hub id, an unsupported model type, a
`model.config` that contradicts the checkpoint's shape, a task resolution that is not a whole number of patches) is
raised here, with the bad value and what is accepted, before training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.image_processing_base import ImageProcessingMixin

from ..adaptation.upcycling import SUPPORTED_DENSE_TYPES, conflicting_fields, upcycled_fields
from ..model.configuration_modsquad import ModSquadConfig
from .recipe import TaskRecipe, TrainingRecipe

# Training resolution of a task that does not set `image_size` when the model starts from scratch.
DEFAULT_IMAGE_SIZE = 224
# Image processor settings a checkpoint passes on to the ModSquad image processor (its own names).
PROCESSOR_SETTINGS = (
    "image_mean",
    "image_std",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "do_convert_rgb",
)


@dataclass
class StartingPoint:
    r"""
    What a recipe's model starts from.

    Args:
        source (`str`, *optional*): the folder or Hub id of `model.pretrained` (`None`: from scratch).
        model_type (`str`, *optional*): its config's `model_type` (`"modsquad"`, `"vit"`, `"deit"`, `"dinov2"`).
        config (`PretrainedConfig`, *optional*): its config.
        patch_size (`int`): patch size of the model to train.
        resolution (`int`): training resolution of the tasks that do not set `image_size`.
        processor_settings (`dict`): [`ModSquadImageProcessor`] keyword arguments read from the checkpoint's image
            processor (`image_mean`, `image_std`, `resample`, ...); empty from scratch (the processor's defaults).
    """

    source: str | None = None
    model_type: str | None = None
    config: PretrainedConfig | None = None
    patch_size: int = ModSquadConfig.patch_size
    resolution: int = DEFAULT_IMAGE_SIZE
    processor_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def is_dense(self) -> bool:
        """Whether the model is upcycled from a dense ViT / DeiT / DINOv2."""
        return self.model_type in SUPPORTED_DENSE_TYPES

    def image_size(self, task: TaskRecipe) -> int:
        """The training and evaluation resolution of `task`: its own `image_size`, or the starting point's."""
        return task.image_size if task.image_size is not None else self.resolution


def resolve_starting_point(recipe: TrainingRecipe) -> StartingPoint:
    """Reads the recipe's `model.pretrained` (config and image processor only, no weights), checks the recipe
    against it and returns the [`StartingPoint`].

    Raises:
        ValueError: the checkpoint cannot be found or read, its model type cannot start a ModSquad model,
            `model.config` sets a field the dense checkpoint fixes to another value (`hidden_size`, `patch_size`, ...,
            `expert_intermediate_size` of the upcycling mode), or a task's resolution is not a multiple of the patch
            size.
    """
    model = recipe.model
    if not model.pretrained:
        patch_size = model.config.get("patch_size", ModSquadConfig.patch_size)
        start = StartingPoint(patch_size=patch_size)
    else:
        config = _load_config(model.pretrained)
        accepted = ["modsquad", *SUPPORTED_DENSE_TYPES]
        if config.model_type not in accepted:
            raise ValueError(
                f"model.pretrained={model.pretrained!r} is a {config.model_type!r} checkpoint, which cannot start a "
                f"ModSquad model; accepted model types: {accepted}"
            )
        settings, resolution = _processor_settings(model.pretrained, config)
        start = StartingPoint(
            model.pretrained, config.model_type, config, config.patch_size, resolution, settings
        )
        if start.is_dense:
            _check_dense_recipe(recipe, config)
        elif model.upcycling:
            raise ValueError(
                f"model.upcycling applies to dense ViT / DeiT / DINOv2 checkpoints; {model.pretrained!r} is a ModSquad "
                "checkpoint (trained on from its own weights): remove model.upcycling"
            )
    for task in recipe.tasks:
        size = start.image_size(task)
        # A non-int patch_size of a scratch recipe is the model config's to reject, with its own message.
        if isinstance(start.patch_size, int) and start.patch_size > 0 and size % start.patch_size:
            where = f"tasks.{task.name}.image_size={size}"
            if task.image_size is None:
                where = f"task {task.name!r} would train at the checkpoint's resolution {size}, which"
            origin = f" of {start.source!r}" if start.source else ""
            below = size // start.patch_size * start.patch_size
            raise ValueError(
                f"{where} is not a multiple of the patch size {start.patch_size}{origin}; accepted: multiples of "
                f"{start.patch_size}, e.g. {below or start.patch_size} or {below + start.patch_size}"
            )
    return start


def _load_config(source: str) -> PretrainedConfig:
    path = Path(source).expanduser()
    looks_like_path = path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1
    if looks_like_path and not path.exists():
        raise ValueError(
            f"model.pretrained={source!r}: no such folder; give a folder saved with save_pretrained (holding "
            "config.json) or a Hub id such as 'facebook/dinov2-small'"
        )
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        kind = "the folder" if path.is_dir() else "the Hub id"
        raise ValueError(
            f"model.pretrained={source!r}: {kind} holds no readable checkpoint config ({str(error).splitlines()[0]}); "
            "give a local folder holding config.json (saved with save_pretrained) or a Hub id such as "
            "'facebook/dinov2-small' (offline, the id must already be in the Hugging Face cache)"
        ) from error


def _processor_settings(source: str, config: PretrainedConfig) -> tuple[dict[str, Any], int]:
    """The image processor settings and the default resolution of a checkpoint, read from its
    `preprocessor_config.json` (the processor class is not needed: only its saved values are)."""
    try:
        saved, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except OSError as error:
        if config.model_type == "modsquad":  # saved without a processor: the ModSquad processor's defaults
            return {}, _resolution(config)
        raise ValueError(
            f"model.pretrained={source!r} has no preprocessor_config.json, so the mean, std and resolution its "
            "weights were trained with are unknown; save that image processor next to the weights "
            "(e.g. AutoImageProcessor.from_pretrained(original).save_pretrained(folder))"
        ) from error
    settings = {key: saved[key] for key in PROCESSOR_SETTINGS if key in saved}
    resolution = None
    if saved.get("do_center_crop") and isinstance(saved.get("crop_size"), dict):
        resolution = saved["crop_size"].get("height")
    elif isinstance(saved.get("size"), dict):
        size = saved["size"]
        resolution = size.get("height", size.get("shortest_edge"))
    elif isinstance(saved.get("size"), int):
        resolution = saved["size"]
    return settings, resolution or _resolution(config)


def _resolution(config: PretrainedConfig) -> int:
    size = config.image_size
    return size[0] if isinstance(size, (list, tuple)) else size


def _check_dense_recipe(recipe: TrainingRecipe, config: PretrainedConfig) -> None:
    """The recipe's `model.config` against what upcycling copies from the dense checkpoint."""
    fields = recipe.model.config
    mode = recipe.model.upcycling.get("mode", "copy")
    copied = upcycled_fields(config, mode, fields.get("num_experts_per_tok"))
    clashes = conflicting_fields(fields, copied)
    if clashes:
        details = ", ".join(
            f"model.config.{key}={asked!r} but the checkpoint has {value!r}"
            for key, (asked, value) in clashes.items()
        )
        raise ValueError(
            f"model.config contradicts the dense checkpoint {recipe.model.pretrained!r}: {details}; upcycling "
            f"(mode {mode!r}) takes these fields from the checkpoint: remove them from model.config or give the "
            "checkpoint's values"
        )


__all__ = ["DEFAULT_IMAGE_SIZE", "StartingPoint", "resolve_starting_point"]
