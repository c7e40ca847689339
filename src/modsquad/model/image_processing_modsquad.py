"""Image processor of ModSquad models: convert to RGB, resize, rescale, normalise (PIL/NumPy backend)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

from .processing_dense import (
    post_process_depth_estimation,
    post_process_semantic_segmentation,
    prepare_depth_labels,
    prepare_segmentation_labels,
)
from .processing_detection import post_process_object_detection, prepare_detection_labels

# PIL modes that convert to RGB without losing meaning; 16/32-bit and float modes are depth or label maps.
SUPPORTED_PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


class ModSquadImageProcessor(PilBackend):
    r"""
    Prepares images for ModSquad models: grey, palette and RGBA images are converted to RGB, then resized to `size`,
    rescaled to [0, 1] and normalised with the ImageNet mean and std.

    Accepts PIL images, NumPy arrays and torch tensors (`HxW`, `HxWxC` or `CxHxW` with 1, 3 or 4 channels), alone
    or in a list. Anything else (a path, a 2-channel array, a 16-bit depth image, ...) raises a `ValueError` naming
    what was received.

    Targets of one task can be passed with the images and come back as `labels` (one batch = one task):
    `annotations` (COCO detection format, boxes in original pixels) become DETR-style dicts with `class_labels` and
    normalised `(cx, cy, w, h)` `boxes`; `segmentation_maps` are resized with nearest neighbours (the ignore index
    survives) to int64 `(H, W)`; `depth_maps` (0 = invalid) are resized with nearest neighbours to float32 `(H, W)`.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`): output size.
        image_mean, image_std (`list[float]`, *optional*): normalisation, ImageNet's by default.
    """

    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    model_input_names = ["pixel_values"]

    def preprocess(
        self, images, annotations=None, segmentation_maps=None, depth_maps=None, **kwargs
    ) -> BatchFeature:
        """Images (and optionally one task's targets) -> `pixel_values` (and `labels`)."""
        targets = {
            "annotations": annotations,
            "segmentation_maps": segmentation_maps,
            "depth_maps": depth_maps,
        }
        given = [name for name, value in targets.items() if value is not None]
        if len(given) > 1:
            raise ValueError(f"one batch holds one task's targets; got {given} together")
        images = checked_images(images)
        return super().preprocess(images, annotations, segmentation_maps, depth_maps, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images,
        annotations,
        segmentation_maps,
        depth_maps,
        do_convert_rgb: bool,
        input_data_format,
        return_tensors,
        **kwargs,
    ) -> BatchFeature:
        images = self._prepare_image_like_inputs(
            images=images, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format
        )
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        pixel_values = self._preprocess(images, return_tensors=None, **kwargs)["pixel_values"]
        data = {"pixel_values": pixel_values}
        height, width = pixel_values[0].shape[-2:]
        dense_targets = segmentation_maps is not None or depth_maps is not None
        if dense_targets and len({tuple(p.shape[-2:]) for p in pixel_values}) > 1:
            raise ValueError("dense targets need images of one size: set do_resize=True with a fixed size")
        skip = None
        if annotations is not None:
            data["labels"] = prepare_detection_labels(annotations, original_sizes)
            skip = ["labels"]  # a list of per-image dicts, as detection models take it
        elif segmentation_maps is not None:
            data["labels"] = prepare_segmentation_labels(segmentation_maps, original_sizes, height, width)
        elif depth_maps is not None:
            data["labels"] = prepare_depth_labels(depth_maps, original_sizes, height, width)
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=skip)

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.5,
        target_sizes=None,
        top_k: int = 100,
        nms_threshold: float | None = 0.5,
    ) -> list[dict]:
        """Detection model outputs -> per image `scores`, `labels` and `(x_min, y_min, x_max, y_max)` `boxes` in
        pixels of `target_sizes` (`(height, width)` per image), or normalised without them; what the
        object-detection pipeline calls. See [`processing_detection.post_process_object_detection`]."""
        return post_process_object_detection(
            outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k, nms_threshold=nms_threshold
        )

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, return_segmentation_scores: bool = False
    ) -> list:
        """Segmentation model outputs -> one `(height, width)` LongTensor class map per image: logits resized
        (bilinear) to `target_sizes` (`(height, width)` per image) then argmax; what the image-segmentation pipeline
        calls. See [`processing_dense.post_process_semantic_segmentation`]."""
        return post_process_semantic_segmentation(
            outputs, target_sizes=target_sizes, return_segmentation_scores=return_segmentation_scores
        )

    def post_process_depth_estimation(self, outputs, target_sizes=None) -> list[dict]:
        """Depth model outputs -> per image `{"predicted_depth": (height, width) tensor}`, resized (bilinear) to
        `target_sizes`; what the depth-estimation pipeline calls. See
        [`processing_dense.post_process_depth_estimation`]."""
        return post_process_depth_estimation(outputs, target_sizes=target_sizes)

    def to_dict(self) -> dict:
        # Resolved through the model config's `model_type` (and its auto_map for remote code) instead of an
        # `image_processor_type`: from that name Transformers also guesses a remote video processor that does not
        # exist and asks users whether to run custom code, every time a pipeline loads.
        output = super().to_dict()
        output.pop("image_processor_type", None)
        return output

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        check_image(image)
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )


def checked_images(images) -> list:
    """One image or a list of them -> a list of checked images, grey `(H, W)` arrays given a channel axis.

    Checking here, before Transformers flattens the input, keeps its guesses out: it would read a string as a path,
    URL or base64 data, and a 4-D array as a batch of any layout.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError(
            "no images given; pass a PIL image, a NumPy array or a torch tensor, or a list of them"
        )
    for image in items:
        check_image(image)
    # Transformers' input flattening does not take 2-D arrays; (H, W, 1) is the same grey image.
    return [image[..., None] if getattr(image, "ndim", None) == 2 else image for image in items]


def check_image(image) -> None:
    """Raises a ValueError for inputs that cannot be turned into an RGB image."""
    if isinstance(image, Image.Image):
        if image.mode not in SUPPORTED_PIL_MODES:
            raise ValueError(
                f"unsupported PIL image mode {image.mode!r}; accepted modes are {list(SUPPORTED_PIL_MODES)} "
                "(convert 16-bit or float images, e.g. depth maps, yourself)"
            )
        if image.width < 1 or image.height < 1:
            raise ValueError(f"empty image: {image.width}x{image.height} pixels")
        return
    shape = getattr(image, "shape", None)
    if shape is None or not hasattr(image, "dtype"):
        raise ValueError(
            f"unsupported image type {type(image).__name__}; pass PIL images, NumPy arrays or torch tensors "
            "(open files yourself, e.g. with PIL.Image.open)"
        )
    valid = len(shape) == 2 or (len(shape) == 3 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4)))
    if not valid:
        raise ValueError(
            f"unsupported image shape {tuple(shape)}; expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4 "
            "(pass a batch as a list of images)"
        )
    channels_first = len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
    spatial = tuple(shape[1:]) if channels_first else tuple(shape[:2])
    if min(spatial) < 1:
        raise ValueError(f"empty image: shape {tuple(shape)} has no pixels")
    # NaN or infinity would be cast to arbitrary bytes (or fail deep inside the conversion to PIL).
    values = image.detach() if hasattr(image, "detach") else image
    floating = (
        values.is_floating_point()
        if hasattr(values, "is_floating_point")
        else np.issubdtype(values.dtype, np.floating)
    )
    if floating:
        finite = (
            bool(values.isfinite().all()) if hasattr(values, "isfinite") else bool(np.isfinite(values).all())
        )
        if not finite:
            raise ValueError(f"image of shape {tuple(shape)} holds NaN or infinite values")


__all__ = ["ModSquadImageProcessor"]
