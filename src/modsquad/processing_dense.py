"""Dense targets (segmentation and depth maps) for the image processor."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_2d_array(label_map, name: str, index: int) -> np.ndarray:
    """A segmentation or depth map (PIL image, NumPy array or tensor, `(H, W)` or `(1, H, W)`) as a 2-D array."""
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


def prepare_segmentation_labels(maps, original_sizes, height: int, width: int) -> list[np.ndarray]:
    """Class-id maps resized (nearest) to the processed image size, as int64 `(H, W)` arrays."""
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
