"""One dataset row of a task (in its Hub column schema) -> one model-ready sample; samples -> a batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..model.configuration_modsquad import TASK_TYPES, check_bool, task_option
from ..model.image_processing_modsquad import check_image
from ..model.processing_detection import BOX_TOLERANCE_PX
from .schemas import task_schema
from .transforms import AugmentConfig, TaskSample, augment_sample, resize_sample

# Depths beyond this multiple of the head's `max_depth` cannot be right for the task (a wrong unit, or max_depth).
DEPTH_RANGE_FACTOR = 2.0


def collate_task_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples of one task -> a batch.

    Returns:
        `dict` with `pixel_values` (`torch.FloatTensor` of shape `(batch_size, 3, H, W)`) and `labels`: stacked
        tensors (class ids `(batch_size,)`, multi-hot `(batch_size, num_labels)`, segmentation `(batch_size, H, W)`
        int64, depth `(batch_size, H, W)` float32) or, for detection, the list of per-image label dicts; plus
        `skipped_rows` (`[(row, reason), ...]`) when some samples stand in for rows that could not be used.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    sizes = {tuple(s["pixel_values"].shape) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"samples of one batch must share a size, got pixel_values shapes {sorted(sizes)}")
    labels = [s["labels"] for s in samples]
    batch = {
        "pixel_values": torch.stack([s["pixel_values"] for s in samples]),
        "labels": labels if isinstance(labels[0], Mapping) else torch.stack(labels),
    }
    # Rows replaced because they could not be used (see `AdaptedDataset`) travel with the batch to the trainer.
    skipped = [item for s in samples for item in s.get("skipped_rows", ())]
    if skipped:
        batch["skipped_rows"] = skipped
    return batch


class TaskDataAdapter:
    r"""
    Turns rows of one task's dataset into model inputs: reads the row through the task type's column schema,
    applies the training augmentation (or a plain resize for evaluation) to the image and its targets together, and
    lets the image processor rescale, normalise and format the labels.

    Label formats (what the heads take):

    - image-classification: class id (`torch.LongTensor`, 0-d); multi-hot `(num_labels,)` float for
      `problem_type="multi_label_classification"` (the label column then holds a list of class ids);
    - object-detection: `{"class_labels": (n,), "boxes": (n, 4) normalised (cx, cy, w, h), "orig_size": (2,)}`;
    - semantic-segmentation: `torch.LongTensor` `(H, W)`, `ignore_index` where nothing is labelled or padded;
    - depth-estimation: `torch.FloatTensor` `(H, W)`, 0 where invalid or padded.

    Args:
        task (`dict`): the task entry (as in `ModSquadConfig.tasks`): `name`, `type` and, for labelled types,
            `num_labels`, `labels` or `id2label`; segmentation may set `ignore_index` (default 255).
        processor ([`ModSquadImageProcessor`]): rescales and normalises images and formats labels.
        train (`bool`): augment (training) or only resize (evaluation).
        image_size (`int` or `tuple[int, int]`, *optional*): `(height, width)` of this task's inputs; defaults to
            the processor's `size`.
        columns (`dict[str, str]`, *optional*): role -> column renames of the task type's schema (see
            `modsquad.data.schemas`), e.g. `{"label": "fine_label"}` or, for detection, `{"bbox": "box"}`.
        augment ([`AugmentConfig`], `dict` or `bool`, *optional*): training augmentation; defaults to
            `AugmentConfig.for_task_type(type)`, a dict overrides those defaults, `False` only resizes. Unused when
            `train=False`.
        schema_options (`dict`, *optional*): options of the schema: `bbox_format` (`"xywh"` or `"xyxy"`) for
            detection, `reduce_labels` for segmentation datasets whose id 0 means "unlabelled" (scene_parse_150).
            Defaults to the task entry's `bbox_format` / `reduce_labels` keys when it has them.
        seed (`int`, *optional*): seed of the augmentations drawn when no `rng` is passed to a call.

    Example:

    ```python
    >>> adapter = TaskDataAdapter(config.get_task("seg"), processor, train=True, image_size=128)
    >>> sample = adapter(dataset[0])  # {"pixel_values": (3, 128, 128), "labels": (128, 128)}
    >>> batch = adapter.collate([adapter(row) for row in dataset.select(range(8))])
    ```"""

    def __init__(
        self,
        task: dict,
        processor,
        train: bool,
        image_size: int | tuple[int, int] | None = None,
        columns: dict[str, str] | None = None,
        augment: AugmentConfig | dict | bool | None = None,
        *,
        schema_options: dict[str, Any] | None = None,
        seed: int | None = None,
    ):
        if not isinstance(task, Mapping) or task.get("type") not in TASK_TYPES:
            raise ValueError(f"task must be a task entry with a 'type' in {list(TASK_TYPES)}, got {task!r}")
        self.task = dict(task)
        self.task_type = task["type"]
        self.num_labels = _num_labels(self.task)
        self.ignore_index = int(self.task.get("ignore_index", 255))
        self.multi_label = self.task.get("problem_type") == "multi_label_classification"
        options = dict(schema_options or {})
        # Data options may also travel in the task entry (a recipe's `head` fields), next to `ignore_index`.
        if self.task_type == "semantic-segmentation":
            options.setdefault("ignore_index", self.ignore_index)
            if "reduce_labels" in self.task:
                options.setdefault("reduce_labels", self.task["reduce_labels"])
        if self.task_type == "object-detection" and "bbox_format" in self.task:
            options.setdefault("bbox_format", self.task["bbox_format"])
        if self.task_type == "depth-estimation":
            if self.task.get("depth_scale") is not None:
                options.setdefault("depth_scale", self.task["depth_scale"])
            self.max_depth = float(task_option(self.task, "max_depth"))
        self.schema = task_schema(self.task_type, columns, **options)
        self.processor = processor
        self.train = check_bool("train", train)
        self.output_size = _output_size(image_size, processor)
        self.augment = _augment_config(augment, self.task_type)
        self._rng = np.random.default_rng(seed)

    # ------------------------------------------------------------------------------------------------ reading
    def read_sample(self, row: Mapping[str, Any], index: int | None = None) -> tuple[TaskSample, Any]:
        """A row as a [`TaskSample`] (image and dense/box targets in pixels) and its image-level label (class id
        or multi-hot vector for classification, else None). Raises a ValueError for an image or annotations that
        cannot be right, naming the dataset row `index` when given."""
        if not isinstance(row, Mapping):
            raise ValueError(f"a row must be a dict of columns (a `datasets` row), got {type(row).__name__}")
        self.schema.check_columns(row)
        at = 0 if index is None else index
        try:
            return self._read_sample(row, at)
        except ValueError as error:
            message = str(error)
            # The schema's own messages already say which row; the adapter's checks say it here.
            if index is not None and not message.startswith(f"row {index}"):
                raise ValueError(f"row {index}: {message}") from error
            raise

    def _read_sample(self, row: Mapping[str, Any], at: int) -> tuple[TaskSample, Any]:
        columns = self.schema.columns
        image = to_rgb_image(row[columns["image"]])
        if self.task_type == "image-classification":
            return TaskSample(image=image), self._class_label(row, at)
        if self.task_type == "object-detection":
            boxes, classes = self.schema.boxes_and_labels(row[columns["objects"]], at)
            self._check_classes(classes, "object categories")
            return TaskSample(image=image, boxes=_checked_boxes(boxes, image), class_labels=classes), None
        single = {columns["image"]: [row[columns["image"]]]}
        if self.task_type == "semantic-segmentation":
            mask = self.schema.label_maps(
                {**single, columns["annotation"]: [row[columns["annotation"]]]}, at
            )[0]
            self._check_classes(mask[mask != self.ignore_index], "segmentation map values")
            return TaskSample(image=image, mask=mask), None
        depth = self.schema.depth_maps({**single, columns["depth_map"]: [row[columns["depth_map"]]]}, at)[0]
        self._check_depth(depth)
        return TaskSample(image=image, depth=depth), None

    def _check_depth(self, depth: np.ndarray) -> None:
        """A depth map must have measurements, in a range the head can predict: a map without any valid pixel
        trains on nothing, and depths far beyond `max_depth` mean a wrong unit (see `DepthSchema`)."""
        valid = depth[depth > 0]
        if not valid.size:
            raise ValueError("the depth map has no valid pixel (all 0, negative or non-finite)")
        if float(valid.max()) > DEPTH_RANGE_FACTOR * self.max_depth:
            scale = self.schema.depth_scale
            rule = (
                f"depth_scale={scale:g}"
                if scale is not None
                else "no depth_scale: integer maps are mm, floats m"
            )
            raise ValueError(
                f"the depth map reaches {float(valid.max()):.4g} m (median {float(np.median(valid)):.4g} m), far above "
                f"max_depth={self.max_depth:g} m: is the unit right ({rule})? Set the task's depth_scale (label units "
                "per stored unit) or raise its max_depth"
            )

    def _class_label(self, row: Mapping[str, Any], at: int = 0) -> torch.Tensor:
        if self.multi_label:
            value = row[self.schema.columns["label"]]
            ids = np.asarray(value).reshape(-1)
            if ids.size and not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"multi-label rows must hold a list of int class ids, got {value!r}")
            self._check_classes(ids, "class ids")
            target = torch.zeros(self.num_labels, dtype=torch.float32)
            target[torch.as_tensor(ids, dtype=torch.long)] = 1.0
            return target
        label = self.schema.references([row], at)[0]
        self._check_classes(np.array([label]), "class id")
        return torch.tensor(label, dtype=torch.long)

    def _check_classes(self, values: np.ndarray, what: str) -> None:
        if values.size and (values.min() < 0 or values.max() >= self.num_labels):
            bad = sorted({int(v) for v in np.asarray(values).reshape(-1) if not 0 <= v < self.num_labels})
            hint = ""
            if self.task_type == "semantic-segmentation" and bad == [self.num_labels]:
                hint = " (if id 0 means 'unlabelled', as in scene_parse_150, pass schema_options={'reduce_labels': True})"
            raise ValueError(
                f"task {self.task.get('name')!r}: {what} {bad[:10]} are out of range; this task has "
                f"{self.num_labels} classes, ids 0..{self.num_labels - 1}{hint}"
            )

    # ---------------------------------------------------------------------------------------------- adapting
    def __call__(
        self, row: Mapping[str, Any], rng: np.random.Generator | None = None, index: int | None = None
    ) -> dict[str, Any]:
        """One row -> `{"pixel_values": FloatTensor (3, H, W), "labels": ...}` (see the class docstring).

        Args:
            row (`dict`): one dataset row in the task's column schema.
            rng (`numpy.random.Generator`, *optional*): randomness of the augmentation (the DataLoader of
                `build_task_dataloader` passes one per row, so batches are reproducible); the adapter's own
                generator when not given.
            index (`int`, *optional*): the row's index in its dataset, which errors name.
        """
        sample, label = self.read_sample(row, index)
        if self.train and self.augment is not None:
            sample = augment_sample(
                sample, self.augment, self.output_size, rng or self._rng, self.ignore_index
            )
        else:
            sample = resize_sample(sample, self.output_size, self.ignore_index)
        targets = {}
        if self.task_type == "object-detection":
            xywh = np.concatenate([sample.boxes[:, :2], sample.boxes[:, 2:] - sample.boxes[:, :2]], axis=1)
            objects = [{"bbox": b.tolist(), "category_id": int(c)} for b, c in zip(xywh, sample.class_labels)]
            targets["annotations"] = [{"image_id": 0, "annotations": objects}]
        elif self.task_type == "semantic-segmentation":
            targets["segmentation_maps"] = [sample.mask]
        elif self.task_type == "depth-estimation":
            targets["depth_maps"] = [sample.depth]
        # The geometry already produced the output size: the processor only rescales, normalises and formats.
        encoded = self.processor(images=[sample.image], do_resize=False, return_tensors="pt", **targets)
        # Classification labels do not go through the processor; every other task's come back formatted.
        if self.task_type != "image-classification":
            label = encoded["labels"][0]
        return {"pixel_values": encoded["pixel_values"][0], "labels": label}

    # A plain function (not a bound method or lambda), so DataLoader workers can pickle it under any start method.
    collate = staticmethod(collate_task_samples)


def to_rgb_image(image: Any) -> Image.Image:
    """A stored image (PIL, or an `(H, W)`, `(H, W, C)` or `(C, H, W)` uint8 / [0, 1] float array) as PIL RGB."""
    check_image(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)
    if np.issubdtype(array.dtype, np.floating):
        # Float images follow the usual [0, 1] convention.
        array = np.clip(array * 255.0 + 0.5, 0, 255)
    array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def _checked_boxes(boxes: np.ndarray, image: Image.Image) -> np.ndarray:
    """Validates `(x_min, y_min, x_max, y_max)` input boxes and clips the tolerated rounding overshoot."""
    width, height = image.size
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box)
        if not np.isfinite(box).all() or x1 <= x0 or y1 <= y0:
            raise ValueError(
                f"invalid box {box.tolist()} (x_min, y_min, x_max, y_max): coordinates must be finite with "
                "x_max > x_min and y_max > y_min (check the dataset's bbox format)"
            )
        tol = BOX_TOLERANCE_PX
        if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
            raise ValueError(
                f"box {box.tolist()} (x_min, y_min, x_max, y_max) lies outside the {width}x{height} image "
                "(check the dataset's bbox format: xywh or xyxy)"
            )
    return np.clip(boxes, 0, [width, height, width, height]).astype(np.float32)


def _num_labels(task: dict) -> int | None:
    if task["type"] == "depth-estimation":
        return None
    for key in ("id2label", "labels"):
        if task.get(key):
            return len(task[key])
    num_labels = task.get("num_labels")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(
            f"task {task.get('name')!r} ({task['type']}) needs 'num_labels', 'labels' or 'id2label'; got {task!r}"
        )
    return num_labels


def _output_size(image_size: Any, processor) -> tuple[int, int]:
    if image_size is None:
        size = getattr(processor, "size", None)
        height, width = (getattr(size, "height", None), getattr(size, "width", None))
        if height is None and isinstance(size, Mapping):
            height, width = size.get("height"), size.get("width")
        if not height or not width:
            raise ValueError(
                f"the processor's size {size!r} is not a fixed height and width; pass image_size=(height, width)"
            )
        return int(height), int(width)
    sides = [image_size, image_size] if isinstance(image_size, int) else list(image_size)
    if len(sides) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise ValueError(
            f"image_size must be a positive int or a (height, width) pair of them, got {image_size!r}"
        )
    return sides[0], sides[1]


def _augment_config(augment: Any, task_type: str) -> AugmentConfig | None:
    if augment is None or augment is True:
        return AugmentConfig.for_task_type(task_type)
    if augment is False:
        return None
    if isinstance(augment, AugmentConfig):
        return augment
    if isinstance(augment, Mapping):
        return AugmentConfig.for_task_type(task_type, **augment)
    raise ValueError(f"augment must be an AugmentConfig, a dict of its fields or a bool, got {augment!r}")


__all__ = ["TaskDataAdapter", "collate_task_samples", "to_rgb_image"]
