"""Dense tasks (segmentation and depth) in the image processor: targets in, post-processed predictions out."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput


def to_2d_array(label_map, name: str, index: int) -> np.ndarray:
    """A segmentation or depth map (PIL image, NumPy array, tensor, or the path of an image file; `(H, W)` or
    `(1, H, W)`) as a 2-D array."""
    if isinstance(label_map, (str, os.PathLike)):
        if not os.path.isfile(label_map):
            raise ValueError(f"{name}[{index}]: no map file at {os.fspath(label_map)!r}")
        with Image.open(label_map) as opened:
            label_map = np.asarray(opened)  # as stored: no RGB conversion, ids and depths kept
    array = np.asarray(label_map.numpy() if hasattr(label_map, "numpy") else label_map)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.squeeze(0) if array.shape[0] == 1 else array.squeeze(-1)
    if array.ndim != 2:
        raise ValueError(f"{name}[{index}] must be a 2-D map (H, W), got shape {array.shape}")
    return array


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize that keeps label ids (and the ignore index, and invalid depth) intact."""
    if array.shape == (height, width):
        return array
    mode = "F" if np.issubdtype(array.dtype, np.floating) else "I"
    image = Image.fromarray(array.astype(np.float32 if mode == "F" else np.int32), mode=mode)
    return np.asarray(image.resize((width, height), Image.NEAREST))


def prepare_segmentation_labels(
    maps,
    original_sizes,
    height: int,
    width: int,
    reduce: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Class-id maps, relabelled by `reduce` when given (e.g. Segformer's `do_reduce_labels`), then resized
    (nearest) to the processed image size, as int64 `(H, W)` arrays."""
    maps = maps if isinstance(maps, (list, tuple)) else [maps]
    if len(maps) != len(original_sizes):
        raise ValueError(f"got {len(maps)} segmentation maps for {len(original_sizes)} images")
    labels = []
    for index, (label_map, size) in enumerate(zip(maps, original_sizes)):
        array = to_2d_array(label_map, "segmentation_maps", index)
        if np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"segmentation_maps[{index}] holds floats ({array.dtype}); class ids must be integers"
            )
        if array.shape != tuple(size):
            raise ValueError(f"segmentation_maps[{index}] is {array.shape} but its image is {tuple(size)}")
        if reduce is not None:
            array = reduce(array)
        labels.append(resize_nearest(array, height, width).astype(np.int64))
    return labels


def prepare_depth_labels(maps, original_sizes, height: int, width: int) -> list[np.ndarray]:
    """Depth maps (metres, 0 = invalid) resized (nearest, so invalid pixels stay invalid) as float32 `(H, W)`."""
    maps = maps if isinstance(maps, (list, tuple)) else [maps]
    if len(maps) != len(original_sizes):
        raise ValueError(f"got {len(maps)} depth maps for {len(original_sizes)} images")
    labels = []
    for index, depth_map in enumerate(maps):
        array = to_2d_array(depth_map, "depth_maps", index).astype(np.float32)
        if array.shape != tuple(original_sizes[index]):
            raise ValueError(
                f"depth_maps[{index}] is {array.shape} but its image is {tuple(original_sizes[index])}"
            )
        if not np.isfinite(array).all() or (array < 0).any():
            raise ValueError(
                f"depth_maps[{index}] has negative or non-finite values; use 0 for invalid pixels"
            )
        labels.append(resize_nearest(array, height, width))
    return labels


def check_target_sizes(target_sizes, batch_size: int) -> list[tuple[int, int] | None]:
    """`target_sizes` (None, a list of `(height, width)` pairs or a `(batch_size, 2)` tensor) as one size or None
    per image."""
    if target_sizes is None:
        return [None] * batch_size
    if hasattr(target_sizes, "tolist"):
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != batch_size:
        raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {batch_size} predictions")
    sizes = []
    for index, size in enumerate(target_sizes):
        size = tuple(size.tolist() if hasattr(size, "tolist") else size)
        if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
            raise ValueError(
                f"target_sizes[{index}] must be a (height, width) pair of positive ints, got {size}"
            )
        sizes.append((int(size[0]), int(size[1])))
    return sizes


def post_process_semantic_segmentation(
    outputs, target_sizes=None, return_segmentation_scores: bool = False
) -> list:
    """Class-id maps from a segmentation model's `logits` `(batch_size, num_labels, h, w)`: logits resized
    (bilinear) to each target size, then argmax.

    Args:
        outputs: a model output with `logits` (e.g. [`ModSquadSemanticSegmenterOutput`]).
        target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `(batch_size, 2)`, *optional*):
            `(height, width)` of each result; without it the maps keep the logits' size.
        return_segmentation_scores (`bool`, *optional*, defaults to `False`): return, per image, a
            `SemanticSegmentationPostProcessorOutput` with `segmentation` and the resized `segmentation_scores`
            `(num_labels, height, width)` instead of the bare map.

    Returns:
        `list[torch.LongTensor]`: one `(height, width)` map per image (or the outputs above).
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    if logits.ndim != 4:
        raise ValueError(
            f"logits must have shape (batch_size, num_labels, height, width), got {tuple(logits.shape)}"
        )
    results = []
    for scores, size in zip(logits, check_target_sizes(target_sizes, logits.shape[0])):
        if size is not None:
            scores = torch.nn.functional.interpolate(
                scores[None], size=size, mode="bilinear", align_corners=False
            )[0]
        segmentation = scores.argmax(dim=0)
        if return_segmentation_scores:
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": segmentation, "segmentation_scores": scores}
                )
            )
        else:
            results.append(segmentation)
    return results


def post_process_depth_estimation(outputs, target_sizes=None) -> list[dict[str, torch.Tensor]]:
    """Depth maps from a depth model's `predicted_depth` `(batch_size, h, w)`, resized to each target size.

    The resize is bilinear, not bicubic as in DPT's processor: bicubic overshoots at depth edges and could make a
    positive depth negative.

    Args:
        outputs: a model output with `predicted_depth` (e.g. [`ModSquadDepthEstimatorOutput`]).
        target_sizes (`list[tuple[int, int]]` or `torch.Tensor` of shape `(batch_size, 2)`, *optional*):
            `(height, width)` of each result; without it the maps keep the model's size.

    Returns:
        `list[dict]`: per image, `{"predicted_depth": torch.Tensor of shape (height, width)}` (the format of the
        Transformers depth processors and the depth-estimation pipeline).
    """
    depth = outputs["predicted_depth"] if isinstance(outputs, dict) else outputs.predicted_depth
    if depth.ndim != 3:
        raise ValueError(
            f"predicted_depth must have shape (batch_size, height, width), got {tuple(depth.shape)}"
        )
    results = []
    for prediction, size in zip(depth, check_target_sizes(target_sizes, depth.shape[0])):
        if size is not None:
            prediction = torch.nn.functional.interpolate(
                prediction[None, None], size=size, mode="bilinear", align_corners=False
            )[0, 0]
        results.append({"predicted_depth": prediction})
    return results
