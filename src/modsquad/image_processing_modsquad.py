"""Image processor of ModSquad models: convert to RGB, resize, rescale, normalise (PIL/NumPy backend)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

# PIL modes that convert to RGB without losing meaning; 16/32-bit and float modes are depth or label maps.
SUPPORTED_PIL_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


class ModSquadImageProcessor(PilBackend):
    r"""
    Prepares images for ModSquad models: grey, palette and RGBA images are converted to RGB, then resized to `size`,
    rescaled to [0, 1] and normalised with the ImageNet mean and std.

    Accepts PIL images, NumPy arrays and torch tensors (`HxW`, `HxWxC` or `CxHxW` with 1, 3 or 4 channels), alone
    or in a list. Anything else (a path, a 2-channel array, a 16-bit depth image, ...) raises a `ValueError` naming
    what was received.

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

    def process_image(self, image, do_convert_rgb=None, input_data_format=None, **kwargs) -> np.ndarray:
        check_image(image)
        return super().process_image(
            image, do_convert_rgb=do_convert_rgb, input_data_format=input_data_format, **kwargs
        )


def check_image(image) -> None:
    """Raises a ValueError for inputs that cannot be turned into an RGB image."""
    if isinstance(image, Image.Image):
        if image.mode not in SUPPORTED_PIL_MODES:
            raise ValueError(
                f"unsupported PIL image mode {image.mode!r}; accepted modes are {list(SUPPORTED_PIL_MODES)} "
                "(convert 16-bit or float images, e.g. depth maps, yourself)"
            )
        return
    shape = getattr(image, "shape", None)
    if shape is None or not hasattr(image, "dtype"):
        raise ValueError(
            f"unsupported image type {type(image).__name__}; pass PIL images, NumPy arrays or torch tensors"
        )
    valid = len(shape) == 2 or (len(shape) == 3 and (shape[0] in (1, 3, 4) or shape[-1] in (1, 3, 4)))
    if not valid:
        raise ValueError(
            f"unsupported image shape {tuple(shape)}; expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4"
        )


__all__ = ["ModSquadImageProcessor"]
