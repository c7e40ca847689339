"""Evaluating a ModSquad model on a `datasets` split: predictions at the original image size, then the task's metric."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from ..data.schemas import TaskSchema, image_size, task_schema
from ..model.configuration_modsquad import check_number
from ..model.image_processing_modsquad import ModSquadImageProcessor, check_image
from . import DepthError, MeanAveragePrecision, MeanIoU, StreamingMetric, TopKAccuracy
from .mean_average_precision import UNDEFINED as COCO_UNDEFINED
from .mean_iou import PER_CATEGORY_KEYS

# How `flatten_metrics` names one class's entry of a per-class result: `per_category_iou` -> `iou_<label>`.
PER_CATEGORY_PREFIX = "per_category_"


def task_metric(
    task: Mapping[str, Any], min_depth: float | None = None, max_depth: float | None = None
) -> StreamingMetric:
    """The metric of a task entry of `ModSquadConfig.tasks`, configured from it.

    Args:
        task (`Mapping`): the task entry (`config.get_task(name)`).
        min_depth, max_depth (`float`, *optional*): valid depth range of a depth-estimation task.

    Returns:
        [`TopKAccuracy`] (top-1, and top-5 for more than 5 classes), [`MeanIoU`] (with the task's `num_labels` and `ignore_index`),
        [`MeanAveragePrecision`] or [`DepthError`].
    """
    task_type = task["type"]
    if (min_depth is not None or max_depth is not None) and task_type != "depth-estimation":
        raise ValueError(
            f"min_depth / max_depth apply to depth-estimation; task {task['name']!r} is {task_type}"
        )
    if task_type == "image-classification":
        if task.get("problem_type") == "multi_label_classification":
            raise ValueError(
                f"task {task['name']!r} is multi-label; evaluation supports single_label_classification only"
            )
        # Top-5 of five classes or fewer is 1 whatever the model does: not a measurement.
        return TopKAccuracy(top_k=(1, 5) if task["num_labels"] > 5 else (1,))
    if task_type == "semantic-segmentation":
        return MeanIoU(num_labels=task["num_labels"], ignore_index=task.get("ignore_index", 255))
    if task_type == "object-detection":
        return MeanAveragePrecision(num_labels=task["num_labels"])
    if task_type == "depth-estimation":
        return DepthError(min_depth=min_depth, max_depth=max_depth)
    raise ValueError(f"no metric for task type {task_type!r}")


def resolve_task(model: torch.nn.Module, task: str | int | None) -> tuple[str, bool]:
    """The task to evaluate and whether `model.forward` must be told it.

    A single-task model (`ModSquadFor<Type>`) serves `model.task`; a multi-task model needs `task` unless its
    config has one task only.
    """
    config = model.config
    served = getattr(model, "task", None)
    if isinstance(served, str):
        if task is not None and config.get_task(task)["name"] != served:
            raise ValueError(f"this model serves task {served!r}, got task={task!r}")
        return served, False
    if task is None:
        if config.num_tasks != 1:
            raise ValueError(f"the model has several tasks {config.task_names}; pass task=<name> to pick one")
        task = config.task_names[0]
    return config.get_task(task)["name"], True


def predictions_at_original_size(
    processor: ModSquadImageProcessor, outputs, task_type: str, sizes: list[tuple[int, int]], threshold: float
) -> list:
    """Post-processes one batch of model outputs into the metric's prediction format at the original sizes."""
    if task_type == "image-classification":
        return list(outputs.logits.detach().float().cpu())
    if task_type == "semantic-segmentation":
        return [m.cpu() for m in processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)]
    if task_type == "object-detection":
        results = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes)
        return [{key: value.detach().cpu() for key, value in result.items()} for result in results]
    if task_type == "depth-estimation":
        results = processor.post_process_depth_estimation(outputs, target_sizes=sizes)
        return [result["predicted_depth"].detach().float().cpu() for result in results]
    raise ValueError(f"no post-processing for task type {task_type!r}")


def flatten_metrics(result: Mapping[str, Any], id2label: Mapping[int, str] | None = None) -> dict[str, float]:
    """A metric result as `dict[str, float]`: per-class lists become `iou_<label>` / `accuracy_<label>` entries (classes
    absent from the split, whose value is NaN, are left out)."""
    flat = {}
    for key, value in result.items():
        if isinstance(value, (list, tuple)):
            for class_id, class_value in enumerate(value):
                if not math.isnan(class_value):
                    flat[per_class_name(key, _label(id2label, class_id))] = float(class_value)
        else:
            flat[key] = float(value)
    return flat


def per_class_name(key: str, label: str) -> str:
    """The flat name of one class's value of the per-class result `key`, e.g. `("per_category_iou", "cat")` ->
    `"iou_cat"`."""
    return f"{key.removeprefix(PER_CATEGORY_PREFIX)}_{label}"


def _label(id2label: Mapping[int, str] | None, class_id: int) -> str:
    return id2label.get(class_id, str(class_id)) if id2label else str(class_id)


def summary_metrics(metrics: Mapping[str, float], task: Mapping[str, Any]) -> dict[str, float]:
    """The values of `metrics` (as [`evaluate_model`] returns them) that describe the task as a whole and are
    defined: per-class entries, NaN and COCO's -1 ("undefined on this split") are left out. What a model card
    publishes.

    Args:
        metrics (`Mapping[str, float]`): flat metrics of one task.
        task (`Mapping`): the task's entry of `ModSquadConfig.tasks` (its labels name the per-class entries).

    Returns:
        `dict[str, float]`, in the order of `metrics`.
    """
    id2label = {int(k): v for k, v in (task.get("id2label") or {}).items()}
    class_ids = range(task.get("num_labels") or len(id2label))
    per_class = {per_class_name(key, _label(id2label, i)) for key in PER_CATEGORY_KEYS for i in class_ids}
    summary = {}
    for name, value in metrics.items():
        if name in per_class or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        if task.get("type") == "object-detection" and value == COCO_UNDEFINED:
            continue
        summary[name] = float(value)
    return summary


@torch.inference_mode()
def evaluate_model(
    model: torch.nn.Module,
    processor: ModSquadImageProcessor,
    dataset: datasets.Dataset | datasets.IterableDataset,
    task: str | int | None = None,
    batch_size: int = 8,
    columns: Mapping[str, str] | str | None = None,
    max_samples: int | None = None,
    *,
    threshold: float = 0.0,
    bbox_format: str | None = None,
    reduce_labels: bool | None = None,
    min_depth: float | None = None,
    max_depth: float | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Runs a ModSquad model over a dataset in the Hub schema of its task and returns the task's metrics, computed at
    the ORIGINAL size of every image.

    Args:
        model: a `ModSquadFor<Type>` model, or a [`ModSquadForMultiTask`] (then `task` picks the head).
        processor ([`ModSquadImageProcessor`]): its image processor.
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): rows in the schema of the task type (see
            [`modsquad.data.schemas`]).
        task (`str` or `int`, *optional*): the task to evaluate; defaults to the model's (only) task.
        batch_size (`int`, *optional*, defaults to 8): images per forward pass.
        columns (`Mapping[str, str]` or `str`, *optional*): role -> column renames, e.g. `{"label": "fine_label"}`.
        max_samples (`int`, *optional*): evaluate only the first `max_samples` rows.
        threshold (`float`, *optional*, defaults to 0.0): detection score threshold. mAP ranks every detection, so
            keep it low; the processor still keeps at most 100 per image.
        bbox_format (`str`, *optional*): detection box format of the dataset, `"xywh"` (default, COCO) or `"xyxy"`.
        reduce_labels (`bool`, *optional*): segmentation datasets whose id 0 is "other" (scene_parse_150).
        min_depth, max_depth (`float`, *optional*): valid depth range (depth-estimation).
        progress (`bool`, *optional*, defaults to `True`): show a progress bar of the images evaluated.

    Returns:
        `dict[str, float]`: classification `accuracy` and, with more than 5 classes, `top5_accuracy`; segmentation `mean_iou`, `mean_accuracy`,
        `overall_accuracy` and `iou_<label>` / `accuracy_<label>`; detection `map`, `map_50`, `map_75`, ... (COCO,
        -1 where undefined); depth `abs_rel`, `rmse`, `delta1`, `delta2`, `delta3`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
    check_number("threshold", threshold, minimum=0, maximum=1)
    for name, value in (("min_depth", min_depth), ("max_depth", max_depth)):
        check_number(name, value, minimum=0, optional=True)
    task_name, pass_task = resolve_task(model, task)
    entry = model.config.get_task(task_name)
    task_type = entry["type"]
    schema = _schema(entry, columns, bbox_format=bbox_format, reduce_labels=reduce_labels)
    metric = task_metric(entry, min_depth=min_depth, max_depth=max_depth)
    if getattr(dataset, "column_names", None):
        schema.check_columns(dataset.column_names)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    if max_samples is not None:
        dataset = dataset.take(max_samples)
        total = max_samples if total is None else min(total, max_samples)

    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    task_kwargs = {"task": task_name} if pass_task else {}
    bar = tqdm(total=total, desc=f"evaluate {task_name}", unit="img", leave=False, disable=not progress)
    try:
        start = 0
        batches = iter(dataset.iter(batch_size=batch_size))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as error:  # a corrupt image file fails while the batch is decoded
                raise ValueError(
                    f"rows {start}..{start + batch_size - 1} of the evaluation data cannot be read: "
                    f"{type(error).__name__}: {error}"
                ) from error
            images = schema.images(batch)
            references = schema.references(batch, start)
            for offset, image in enumerate(images):
                try:
                    check_image(image)
                except ValueError as error:
                    raise ValueError(f"row {start + offset}: {error}") from error
            start += len(images)
            sizes = [tuple(image_size(image)) for image in images]
            pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
            outputs = model(pixel_values=pixel_values, **task_kwargs)
            predictions = predictions_at_original_size(processor, outputs, task_type, sizes, threshold)
            metric.add_batch(predictions=predictions, references=references)
            bar.update(len(images))
    finally:
        bar.close()
        model.train(was_training)
    if len(metric) == 0:
        raise ValueError("the dataset has no rows to evaluate")
    return flatten_metrics(metric.compute(), entry.get("id2label"))


def _schema(
    entry: Mapping[str, Any], columns, bbox_format: str | None, reduce_labels: bool | None
) -> TaskSchema:
    """The dataset schema of a task entry; options of another task type are an error, not silently dropped."""
    task_type = entry["type"]
    options: dict[str, Any] = {}
    if bbox_format is not None:
        if task_type != "object-detection":
            raise ValueError(
                f"bbox_format applies to object-detection; task {entry['name']!r} is {task_type}"
            )
        options["bbox_format"] = bbox_format
    if reduce_labels is not None:
        if task_type != "semantic-segmentation":
            raise ValueError(
                f"reduce_labels applies to semantic-segmentation; task {entry['name']!r} is {task_type}"
            )
        options["reduce_labels"] = reduce_labels
    if task_type == "semantic-segmentation":
        options["ignore_index"] = entry.get("ignore_index", 255)
        if reduce_labels is None and "reduce_labels" in entry:
            options["reduce_labels"] = entry["reduce_labels"]
    if task_type == "object-detection" and bbox_format is None and "bbox_format" in entry:
        options["bbox_format"] = entry["bbox_format"]
    if task_type == "depth-estimation" and entry.get("depth_scale") is not None:
        # The unit the model was trained in (see `DepthSchema`): references are read the same way.
        options["depth_scale"] = entry["depth_scale"]
    return task_schema(task_type, columns, **options)


__all__ = [
    "evaluate_model",
    "flatten_metrics",
    "per_class_name",
    "predictions_at_original_size",
    "resolve_task",
    "summary_metrics",
    "task_metric",
]
