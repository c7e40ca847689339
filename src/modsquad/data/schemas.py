"""Column schemas of the Hub datasets of each task type, and their conversion to processor inputs and metric
references.

A schema maps *roles* (what a column means) to column names. The defaults are the columns of the usual Hub datasets:

| task type               | roles and default columns                                   | like                         |
|-------------------------|-------------------------------------------------------------|------------------------------|
| `image-classification`  | `image`, `label` (class id)                                 | imagenet-1k                  |
| `object-detection`      | `image`, `objects` holding `bbox` (COCO x, y, w, h pixels)  | cppe-5, detection-datasets/coco |
|                         | and `category` (class id)                                   |                              |
| `semantic-segmentation` | `image`, `annotation` (PIL "L"/"P" image of class ids)       | scene_parse_150              |
| `depth-estimation`      | `image`, `depth_map` (PIL "F" image or 2-D array, 0 = invalid) | nyu_depth_v2              |

For detection, `bbox` and `category` name keys inside `objects`, which may be a dict of lists (a `datasets`
`Sequence` of a dict) or a list of dicts (a `List` of a dict). A batch is what `dataset[i:j]` returns (a dict of
columns) or a list of row dicts (what a `DataLoader` hands its `collate_fn`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from transformers.image_utils import get_image_size

from ..model.configuration_modsquad import BBOX_FORMATS, check_bool, check_number
from ..model.processing_dense import to_2d_array


def parse_columns(text: str) -> dict[str, str]:
    """Parses a column mapping written as `"role=column,role=column"` (the CLI's `--columns`).

    Args:
        text (`str`): e.g. `"image=img,label=fine_label"`.

    Returns:
        `dict[str, str]`: role -> column name.
    """
    mapping = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        role, sep, column = (s.strip() for s in item.partition("="))
        if not sep or not role or not column:
            raise ValueError(f"column mapping item {item!r} must look like role=column, e.g. 'image=img'")
        mapping[role] = column
    return mapping


def image_size(image: Any) -> tuple[int, int]:
    """`(height, width)` of a PIL image or an `(H, W)`, `(H, W, C)` or `(C, H, W)` array or tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if array.ndim == 2:
        return array.shape
    return tuple(get_image_size(array))


def as_columns(batch: Mapping[str, list] | list[Mapping[str, Any]]) -> dict[str, list]:
    """A batch as a dict of columns, whether it came as one (`dataset[i:j]`) or as a list of rows."""
    if isinstance(batch, Mapping):
        return dict(batch)
    rows = list(batch)
    if not rows or not all(isinstance(row, Mapping) for row in rows):
        raise ValueError("a batch must be a dict of columns or a non-empty list of row dicts")
    return {key: [row[key] for row in rows] for key in rows[0]}


@dataclass(frozen=True)
class TaskSchema(ABC):
    """How the rows of one task type's datasets become processor inputs and metric references.

    Args:
        columns (`Mapping[str, str]`, *optional*): role -> column name, overriding the defaults of `default_columns`.
    """

    task_type: ClassVar[str] = ""
    default_columns: ClassVar[dict[str, str]] = {}
    # Roles that name keys inside another column rather than columns of the dataset.
    nested_roles: ClassVar[tuple[str, ...]] = ()

    columns: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.columns) - set(self.default_columns))
        if unknown:
            raise ValueError(
                f"unknown column roles {unknown} for {self.task_type}; accepted roles: {list(self.default_columns)}"
            )
        object.__setattr__(self, "columns", {**self.default_columns, **self.columns})

    def check_columns(self, column_names: Iterable[str]) -> None:
        """Raises a ValueError naming the missing columns, the columns present and how to map them."""
        present = list(column_names)
        for role, name in self.columns.items():
            if role in self.nested_roles or name in present:
                continue
            raise ValueError(
                f"the {self.task_type} schema reads column {name!r} (role {role!r}) but the dataset has columns "
                f"{present}; map it with columns={{{role!r}: '<column>'}} (CLI: --columns {role}=<column>)"
            )

    def images(self, batch) -> list:
        """The images of a batch, as stored (usually PIL images)."""
        columns = self._columns_of(batch)
        return list(columns[self.columns["image"]])

    def processor_inputs(self, batch, start: int = 0) -> tuple[list, dict[str, list]]:
        """`(images, targets)` such that `processor(images=images, **targets)` prepares the batch with its labels.

        Classification has no processor targets (its labels go to the model directly): see [`references`].
        `start` is the dataset row of the batch's first row: errors name dataset rows.
        """
        columns = self._columns_of(batch)
        return list(columns[self.columns["image"]]), self._targets(columns, start)

    def references(self, batch, start: int = 0) -> list:
        """The references of a batch in the format of the task type's metric, at the original image size (`start`:
        the dataset row of the batch's first row, which errors name)."""
        return self._references(self._columns_of(batch), start)

    def _columns_of(self, batch) -> dict[str, list]:
        columns = as_columns(batch)
        self.check_columns(columns)
        return columns

    @abstractmethod
    def _targets(self, columns: dict[str, list], start: int = 0) -> dict[str, list]: ...

    @abstractmethod
    def _references(self, columns: dict[str, list], start: int = 0) -> list: ...


@dataclass(frozen=True)
class ClassificationSchema(TaskSchema):
    """`image`, `label` (an int class id, e.g. a `ClassLabel`). References: the class ids."""

    task_type: ClassVar[str] = "image-classification"
    default_columns: ClassVar[dict[str, str]] = {"image": "image", "label": "label"}

    def _targets(self, columns: dict[str, list], start: int = 0) -> dict[str, list]:
        return {}

    def _references(self, columns: dict[str, list], start: int = 0) -> list[int]:
        name = self.columns["label"]
        labels = []
        for index, label in enumerate(columns[name], start):
            if isinstance(label, (bool, str)) or not isinstance(label, (int, np.integer)):
                raise ValueError(
                    f"row {index}: column {name!r} holds {label!r} ({type(label).__name__}); labels must be int class "
                    "ids (cast a string column with datasets.ClassLabel)"
                )
            labels.append(int(label))
        return labels


@dataclass(frozen=True)
class DetectionSchema(TaskSchema):
    """`image`, `objects` with `bbox` and `category` keys.

    Args:
        columns (`Mapping[str, str]`, *optional*): role -> name; `bbox` and `category` name keys inside `objects`.
        bbox_format (`str`, *optional*, defaults to `"xywh"`): `"xywh"` (COCO: x_min, y_min, width, height) or
            `"xyxy"` (x_min, y_min, x_max, y_max), in pixels.

    References: per image `{"boxes": (n, 4) xyxy pixels, "labels": (n,)}`. Processor targets: `annotations` in COCO
    format.
    """

    task_type: ClassVar[str] = "object-detection"
    default_columns: ClassVar[dict[str, str]] = {
        "image": "image",
        "objects": "objects",
        "bbox": "bbox",
        "category": "category",
    }
    nested_roles: ClassVar[tuple[str, ...]] = ("bbox", "category")

    bbox_format: str = "xywh"

    def __post_init__(self):
        super().__post_init__()
        if self.bbox_format not in BBOX_FORMATS:
            raise ValueError(f"bbox_format={self.bbox_format!r}; accepted: {list(BBOX_FORMATS)}")

    def boxes_and_labels(self, objects: Any, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """One row's `objects` -> `(xyxy boxes (n, 4) float32, class ids (n,) int64)`."""
        bbox_key, category_key = self.columns["bbox"], self.columns["category"]
        if objects is None:
            objects = []
        if isinstance(objects, Mapping):
            missing = [key for key in (bbox_key, category_key) if key not in objects]
            boxes, labels = objects.get(bbox_key), objects.get(category_key)
        elif isinstance(objects, (list, tuple)) and all(isinstance(obj, Mapping) for obj in objects):
            missing = sorted({key for obj in objects for key in (bbox_key, category_key) if key not in obj})
            boxes = [obj.get(bbox_key) for obj in objects]
            labels = [obj.get(category_key) for obj in objects]
        else:
            raise ValueError(
                f"row {index}: column {self.columns['objects']!r} must be a dict of lists or a list of dicts, got "
                f"{type(objects).__name__}"
            )
        if missing:
            raise ValueError(
                f"row {index}: objects lack keys {missing}; they have {sorted(_keys(objects))}. Map them with "
                "columns={'bbox': '<key>', 'category': '<key>'}"
            )
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(boxes):
            raise ValueError(f"row {index}: {len(boxes)} boxes but {len(labels)} categories")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"row {index}: categories must be int class ids, got {labels.dtype}")
        if not np.isfinite(boxes).all():
            bad = boxes[~np.isfinite(boxes).all(axis=1)]
            raise ValueError(
                f"row {index}: boxes {bad[:3].tolist()} have non-finite (NaN or infinite) coordinates"
            )
        if self.bbox_format == "xywh":
            boxes = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        return boxes, labels.astype(np.int64)

    def _rows(self, columns: dict[str, list], start: int = 0):
        for index, objects in enumerate(columns[self.columns["objects"]]):
            yield index, *self.boxes_and_labels(objects, start + index)

    def _targets(self, columns: dict[str, list], start: int = 0) -> dict[str, list]:
        image_ids = columns.get("image_id") or list(range(len(columns[self.columns["image"]])))
        annotations = []
        for index, boxes, labels in self._rows(columns, start):
            xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
            objects = [
                {
                    "bbox": box.tolist(),
                    "category_id": int(label),
                    "area": float(box[2] * box[3]),
                    "iscrowd": 0,
                }
                for box, label in zip(xywh, labels)
            ]
            annotations.append({"image_id": image_ids[index], "annotations": objects})
        return {"annotations": annotations}

    def _references(self, columns: dict[str, list], start: int = 0) -> list[dict[str, np.ndarray]]:
        return [{"boxes": boxes, "labels": labels} for _, boxes, labels in self._rows(columns, start)]


@dataclass(frozen=True)
class SegmentationSchema(TaskSchema):
    """`image`, `annotation` (a single-channel map of class ids).

    Args:
        columns (`Mapping[str, str]`, *optional*): role -> column name.
        reduce_labels (`bool`, *optional*, defaults to `False`): for datasets whose id 0 means "other / unlabelled"
            (scene_parse_150): 0 becomes `ignore_index` and every other id is lowered by one.
        ignore_index (`int`, *optional*, defaults to 255): the id of pixels that are not counted.

    References and processor targets: int64 `(height, width)` maps at the original size.
    """

    task_type: ClassVar[str] = "semantic-segmentation"
    default_columns: ClassVar[dict[str, str]] = {"image": "image", "annotation": "annotation"}

    reduce_labels: bool = False
    ignore_index: int = 255

    def __post_init__(self):
        super().__post_init__()
        check_bool("reduce_labels", self.reduce_labels)
        check_number("ignore_index", self.ignore_index, integer=True)

    def label_maps(self, columns: dict[str, list], start: int = 0) -> list[np.ndarray]:
        """The class-id maps of a batch (`start`: the dataset row of its first row, which errors name)."""
        name = self.columns["annotation"]
        maps = []
        for index, (image, annotation) in enumerate(
            zip(columns[self.columns["image"]], columns[name]), start
        ):
            array = to_2d_array(annotation, name, index)
            if not np.issubdtype(array.dtype, np.integer):
                raise ValueError(
                    f"row {index}: column {name!r} holds {array.dtype} values; it must hold int class ids (a PIL "
                    "'L' or 'P' image, or an int array)"
                )
            _check_size(array, image, name, index)
            array = array.astype(np.int64)
            if self.reduce_labels:
                ignored = (array == 0) | (array == self.ignore_index)
                array = np.where(ignored, self.ignore_index, array - 1)
            maps.append(array)
        return maps

    def _targets(self, columns: dict[str, list], start: int = 0) -> dict[str, list]:
        return {"segmentation_maps": self.label_maps(columns, start)}

    def _references(self, columns: dict[str, list], start: int = 0) -> list[np.ndarray]:
        return self.label_maps(columns, start)


@dataclass(frozen=True)
class DepthSchema(TaskSchema):
    """`image`, `depth_map` (a map of depths; 0, negative and non-finite values mark missing measurements).

    The unit rule: depth in label units (metres) = stored value x `depth_scale`. Without `depth_scale`, float maps
    (PIL "F" images, float arrays) are metres and integer maps (uint16 PNGs, PIL "I;16" / "I" images, int arrays)
    are millimetres, as NYU Depth v2's raw data and ScanNet store them (`depth_scale = 0.001`). Other encodings set
    it: KITTI's uint16 PNGs hold metres x 256 (`depth_scale: 0.00390625`), TUM RGB-D's metres x 5000 (`0.0002`).

    Args:
        columns (`Mapping[str, str]`, *optional*): role -> column name.
        depth_scale (`float`, *optional*): label units per stored unit (see above).

    References and processor targets: float32 `(height, width)` maps at the original size, in metres, with every
    invalid pixel set to 0 (the processor's and the metric's "no measurement").
    """

    task_type: ClassVar[str] = "depth-estimation"
    default_columns: ClassVar[dict[str, str]] = {"image": "image", "depth_map": "depth_map"}

    depth_scale: float | None = None

    def __post_init__(self):
        super().__post_init__()
        scale = self.depth_scale
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not np.isfinite(scale)
            or scale <= 0
        ):
            raise ValueError(
                f"depth_scale must be a finite number > 0 (label units per stored unit), got {scale!r}"
            )

    def scale_for(self, array: np.ndarray) -> float:
        """The factor from a stored map's values to metres (see the class docstring)."""
        if self.depth_scale is not None:
            return float(self.depth_scale)
        return 0.001 if np.issubdtype(array.dtype, np.integer) else 1.0

    def depth_maps(self, columns: dict[str, list], start: int = 0) -> list[np.ndarray]:
        """The depth maps of a batch in metres (`start`: the dataset row of its first row, which errors name)."""
        name = self.columns["depth_map"]
        maps = []
        for index, (image, depth_map) in enumerate(zip(columns[self.columns["image"]], columns[name]), start):
            raw = to_2d_array(depth_map, name, index)
            if raw.dtype == bool or not (
                np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
            ):
                raise ValueError(
                    f"row {index}: column {name!r} holds {raw.dtype} values; depth maps hold numbers"
                )
            _check_size(raw, image, name, index)
            array = raw.astype(np.float64) * self.scale_for(raw)
            with np.errstate(invalid="ignore"):
                maps.append(np.where(np.isfinite(array) & (array > 0), array, 0.0).astype(np.float32))
        return maps

    def _targets(self, columns: dict[str, list], start: int = 0) -> dict[str, list]:
        return {"depth_maps": self.depth_maps(columns, start)}

    def _references(self, columns: dict[str, list], start: int = 0) -> list[np.ndarray]:
        return self.depth_maps(columns, start)


SCHEMAS: dict[str, type[TaskSchema]] = {
    cls.task_type: cls for cls in (ClassificationSchema, DetectionSchema, SegmentationSchema, DepthSchema)
}


def task_schema(task_type: str, columns: Mapping[str, str] | str | None = None, **options) -> TaskSchema:
    """The schema of a task type, with optional column renames and options.

    Args:
        task_type (`str`): one of `"image-classification"`, `"object-detection"`, `"semantic-segmentation"`,
            `"depth-estimation"`.
        columns (`Mapping[str, str]` or `str`, *optional*): role -> column name, or the `"role=column,..."` form.
        **options: options of that schema (`bbox_format` for detection; `reduce_labels`, `ignore_index` for
            segmentation; `depth_scale` for depth).

    Returns:
        [`TaskSchema`]

    Example:

    ```python
    >>> schema = task_schema("image-classification", columns="image=img,label=fine_label")
    >>> images, targets = schema.processor_inputs(dataset[:8])
    >>> labels = schema.references(dataset[:8])
    ```"""
    if task_type not in SCHEMAS:
        raise ValueError(f"no dataset schema for task type {task_type!r}; accepted: {sorted(SCHEMAS)}")
    schema_class = SCHEMAS[task_type]
    accepted = sorted(f.name for f in fields(schema_class) if f.name != "columns")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"options {unknown} do not apply to {task_type} datasets; accepted options: {accepted}"
        )
    if isinstance(columns, str):
        columns = parse_columns(columns)
    return schema_class(columns=dict(columns or {}), **options)


def _check_size(array: np.ndarray, image: Any, name: str, index: int) -> None:
    if array.shape != tuple(image_size(image)):
        raise ValueError(
            f"row {index}: column {name!r} is {array.shape[0]}x{array.shape[1]} but its image is "
            f"{'x'.join(map(str, image_size(image)))} (height x width); maps must match their images"
        )


def _keys(objects: Any) -> set[str]:
    if isinstance(objects, Mapping):
        return set(objects)
    return {key for obj in objects for key in obj}


__all__ = [
    "BBOX_FORMATS",
    "SCHEMAS",
    "ClassificationSchema",
    "DepthSchema",
    "DetectionSchema",
    "SegmentationSchema",
    "TaskSchema",
    "as_columns",
    "image_size",
    "parse_columns",
    "task_schema",
]
