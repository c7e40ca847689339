"""Image processor of ModSquad models: convert to RGB, resize, rescale, normalise (PIL/NumPy backend)."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import numpy as np
from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    PILImageResampling,
    load_image,
)
from transformers.processing_utils import ImagesKwargs

from .processing_dense import (
    post_process_depth_estimation,
    post_process_semantic_segmentation,
    prepare_depth_labels,
    prepare_segmentation_labels,
)
from .processing_detection import post_process_object_detection, prepare_detection_labels

# PIL modes that convert to RGB without losing meaning; 16/32-bit and float modes are depth or label maps.
SUPPORTED_PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


class ModSquadImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Whether to reduce every id of the segmentation maps by 1 and make 0 the ignored value 255: for datasets whose
        id 0 is "other" and not one of the classes (ADE20K), as Segformer's image processor does.
    """

    do_reduce_labels: bool


class ModSquadImageProcessor(PilBackend):
    r"""
    Prepares images for ModSquad models: grey, palette and RGBA images are converted to RGB, then resized to `size`,
    rescaled to [0, 1] and normalised with the ImageNet mean and std.

    Accepts PIL images, NumPy arrays and torch tensors (`HxW`, `HxWxC` or `CxHxW` with 1, 3 or 4 channels), and,
    as Transformers' `load_image` does, image file paths (`str` or `os.PathLike`, also as `file://` URLs), `http(s)`
    URLs and base64 `data:image/...` strings; alone or in a list. Anything else (a missing file, a 2-channel array,
    a 16-bit depth image, ...) raises a `ValueError` naming what was received.

    Targets of one task can be passed with the images and come back as `labels` (one batch = one task):
    `annotations` (COCO detection format as DETR's processor takes it: `{"image_id", "annotations": [{"bbox",
    "category_id", "area", "iscrowd"}]}`, boxes in original pixels) become DETR-style dicts with `class_labels`,
    normalised `(cx, cy, w, h)` `boxes`, `area`, `iscrowd`, `image_id`, `orig_size` and `size`; `segmentation_maps`
    are resized with nearest neighbours (the ignore index survives) to int64 `(H, W)`, after `do_reduce_labels`;
    `depth_maps` (0 = invalid) are resized with nearest neighbours to float32 `(H, W)`. Maps may be given as file
    paths too.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 224, "width": 224}`): output size.
        image_mean, image_std (`list[float]`, *optional*): normalisation, ImageNet's by default.
        do_reduce_labels (`bool`, *optional*, defaults to `False`): see [`ModSquadImageProcessorKwargs`].
    """

    valid_kwargs = ModSquadImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"height": 224, "width": 224}
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    do_reduce_labels = False
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

    @staticmethod
    def reduce_label(label_map: np.ndarray) -> np.ndarray:
        """Segformer's label reduction: every id minus 1, and 0 ("other") to 255, the ignored value."""
        reduced = label_map.astype(np.int64) - 1
        reduced[label_map == 0] = 255
        reduced[reduced == 254] = 255
        return reduced

    def _preprocess_image_like_inputs(
        self,
        images,
        annotations,
        segmentation_maps,
        depth_maps,
        do_convert_rgb: bool,
        input_data_format,
        return_tensors,
        do_reduce_labels: bool = False,
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
            processed_sizes = [tuple(p.shape[-2:]) for p in pixel_values]
            data["labels"] = prepare_detection_labels(annotations, original_sizes, processed_sizes)
            skip = ["labels"]  # a list of per-image dicts, as detection models take it
        elif segmentation_maps is not None:
            data["labels"] = prepare_segmentation_labels(
                segmentation_maps,
                original_sizes,
                height,
                width,
                reduce=self.reduce_label if do_reduce_labels else None,
            )
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
        peak_kernel: int | None = 3,
    ) -> list[dict]:
        """Detection model outputs -> per image `scores`, `labels` and `(x_min, y_min, x_max, y_max)` `boxes` in
        pixels of `target_sizes` (`(height, width)` per image), or normalised without them; what the
        object-detection pipeline calls. See [`processing_detection.post_process_object_detection`]."""
        return post_process_object_detection(
            outputs,
            threshold=threshold,
            target_sizes=target_sizes,
            top_k=top_k,
            nms_threshold=nms_threshold,
            peak_kernel=peak_kernel,
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

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        check_image(image)
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )


def load_image_input(image):
    """An image given by address -> a PIL image (anything else is returned as it is).

    Paths (`str`, `os.PathLike`, `file://` URLs) are opened here, with an error naming a missing file;
    `http(s)://` URLs and `data:image/...` base64 strings go to Transformers' `load_image`, as in its processors.
    """
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    if not isinstance(image, str):
        return image
    if image.startswith(("http://", "https://", "data:image/")):
        return load_image(image)
    path = url2pathname(unquote(urlparse(image).path)) if image.startswith("file://") else image
    if not os.path.isfile(path):
        raise ValueError(
            f"no image file at {image!r}; pass a path to an image file, an http(s) URL, a PIL image, a NumPy "
            "array or a torch tensor"
        )
    return load_image(
        path
    )  # applies the EXIF orientation and converts to RGB, as Transformers' processors do


# Saved as remote code with its own `auto_map` (and the modules it imports), so that a processor saved on its own
# loads with `AutoImageProcessor` where the package is not installed (`trust_remote_code=True`); where it is, the
# `image_processor_type` written beside it resolves to this class and nothing prompts.
ModSquadImageProcessor.register_for_auto_class("AutoImageProcessor")


def checked_images(images) -> list:
    """One image or a list of them -> a list of checked images, grey `(H, W)` arrays given a channel axis.

    Checking here, before Transformers flattens the input, keeps its guesses out: it would read any other string as
    base64 data, and a 4-D array as a batch of any layout.
    """
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    items = [load_image_input(image) for image in items]
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


__all__ = ["ModSquadImageProcessor", "ModSquadImageProcessorKwargs"]
