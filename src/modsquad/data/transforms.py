"""Geometric augmentations applied consistently to an image and its targets (boxes, masks, depth), without
torchvision.

Every augmentation here is one axis-aligned geometry: crop a box of the source image, resize it, take an
output-sized window of the result (cropping or padding) and optionally mirror it. Sampling that geometry once and
applying it to the image, the boxes, the segmentation mask and the depth map keeps them aligned by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
from PIL import Image

from ..model.configuration_modsquad import check_number, reject_unknown_keys

GEOMETRIES = ("random_resized_crop", "scale_jitter", "resize")
# Padding colour of images: the ImageNet mean, which normalises to ~0 and so adds no spurious edge energy.
IMAGE_PAD_COLOR = (124, 116, 104)
# Depth 0 means "no measurement": padded and cut-away pixels are invalid, never a real distance.
INVALID_DEPTH = 0.0


@dataclass
class AugmentConfig:
    r"""
    Training-time augmentation of one task. Evaluation always uses a plain resize.

    Args:
        geometry (`str`, *optional*, defaults to `"random_resized_crop"`):
            `"random_resized_crop"` (a random box of `crop_scale` of the area and `crop_ratio` aspect, resized to the
            output size), `"scale_jitter"` (resize to the output size times a factor drawn from `jitter_scale`, then
            crop or pad back to the output size at a random place) or `"resize"` (no geometric randomness).
        crop_scale (`tuple[float, float]`, *optional*, defaults to `(0.35, 1.0)`): area fraction range of the
            random resized crop, in (0, 1].
        crop_ratio (`tuple[float, float]`, *optional*, defaults to `(3/4, 4/3)`): aspect-ratio (width / height,
            relative to the output's) range of the random resized crop.
        jitter_scale (`tuple[float, float]`, *optional*, defaults to `(0.8, 1.25)`): resize-factor range of the
            scale jitter; factors below 1 pad, above 1 crop.
        hflip_prob (`float`, *optional*, defaults to 0.5): probability of a horizontal flip.
        min_box_visibility (`float`, *optional*, defaults to 0.25): a box is dropped when less than this fraction
            of its (transformed) area stays inside the output.
        min_box_size (`float`, *optional*, defaults to 1.0): a box is dropped when its visible width or height is
            below this many output pixels.

    Use [`AugmentConfig.for_task_type`] for the defaults of a task type.
    """

    geometry: str = "random_resized_crop"
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_scale: tuple[float, float] = (0.8, 1.25)
    hflip_prob: float = 0.5
    min_box_visibility: float = 0.25
    min_box_size: float = 1.0

    def __post_init__(self):
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry={self.geometry!r}; accepted: {list(GEOMETRIES)}")
        # YAML and JSON give lists; keep tuples so configs compare and hash predictably.
        self.crop_scale = _check_range("crop_scale", self.crop_scale, upper=1.0)
        self.crop_ratio = _check_range("crop_ratio", self.crop_ratio)
        self.jitter_scale = _check_range("jitter_scale", self.jitter_scale)
        for name in ("hflip_prob", "min_box_visibility"):
            check_number(name, getattr(self, name), minimum=0, maximum=1)
        check_number("min_box_size (output pixels)", self.min_box_size, minimum=0)

    @classmethod
    def for_task_type(cls, task_type: str, **overrides) -> AugmentConfig:
        """Sensible defaults per task type, with `overrides` applied.

        Classification: random resized crop, scale (0.35, 1), flip. Detection: scale jitter (0.8, 1.25), flip (a
        large crop would cut most boxes). Segmentation: scale jitter (0.75, 1.5), flip. Depth: mild scale jitter
        (0.9, 1.1), flip (zooming changes apparent size but not the metric depth, so keep it mild).
        """
        defaults = {
            "image-classification": {"geometry": "random_resized_crop", "crop_scale": (0.35, 1.0)},
            "object-detection": {"geometry": "scale_jitter", "jitter_scale": (0.8, 1.25)},
            "semantic-segmentation": {"geometry": "scale_jitter", "jitter_scale": (0.75, 1.5)},
            "depth-estimation": {"geometry": "scale_jitter", "jitter_scale": (0.9, 1.1)},
        }
        if task_type not in defaults:
            raise ValueError(f"unknown task type {task_type!r}; accepted: {sorted(defaults)}")
        reject_unknown_keys(overrides, [f.name for f in fields(cls)], "augment")
        return cls(**{**defaults[task_type], **overrides})


def _check_range(name: str, value, upper: float | None = None) -> tuple[float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
        )
        or not 0 < value[0] <= value[1]
        or (upper is not None and value[1] > upper)
    ):
        limit = f" <= {upper}" if upper is not None else ""
        raise ValueError(
            f"{name} must be a (low, high) pair of finite numbers with 0 < low <= high{limit}, got {value!r}"
        )
    return float(value[0]), float(value[1])


@dataclass
class TaskSample:
    """One image with the targets of its task, in pixels of that image.

    Args:
        image (`PIL.Image.Image`): RGB image.
        boxes (`np.ndarray` of shape `(num_boxes, 4)`, *optional*): `(x_min, y_min, x_max, y_max)` in pixels.
        class_labels (`np.ndarray` of shape `(num_boxes,)`, *optional*): class id of each box.
        mask (`np.ndarray` of shape `(height, width)`, *optional*): integer class-id map.
        depth (`np.ndarray` of shape `(height, width)`, *optional*): float depth map, 0 = invalid.
    """

    image: Image.Image
    boxes: np.ndarray | None = None
    class_labels: np.ndarray | None = None
    mask: np.ndarray | None = None
    depth: np.ndarray | None = None

    @property
    def size_hw(self) -> tuple[int, int]:
        return self.image.height, self.image.width


@dataclass(frozen=True)
class Geometry:
    """An axis-aligned geometric transform: crop, resize, window (crop or pad), mirror.

    Args:
        crop (`tuple[int, int, int, int]`): `(left, top, right, bottom)` box of the source image that is kept.
        resized (`tuple[int, int]`): `(height, width)` the crop is resized to.
        output (`tuple[int, int]`): `(height, width)` of the result.
        offset (`tuple[int, int]`, *optional*): `(y, x)` of the output window's corner in the resized crop;
            negative values pad before the crop.
        flip (`bool`): mirror the result horizontally.
    """

    crop: tuple[int, int, int, int]
    resized: tuple[int, int]
    output: tuple[int, int]
    offset: tuple[int, int] = (0, 0)
    flip: bool = False

    def apply_to_image(self, image: Image.Image) -> Image.Image:
        # PIL's resize with `box` crops and resizes in one antialiased step, like the processor's own resize.
        resized = np.asarray(image.resize(self.resized[::-1], Image.BILINEAR, box=self.crop))
        fill = np.array(IMAGE_PAD_COLOR, dtype=resized.dtype)
        return Image.fromarray(self._window(resized, fill))

    def apply_to_map(self, array: np.ndarray, fill: float) -> np.ndarray:
        """Nearest-neighbour transform of a label or depth map (no new values are ever invented)."""
        floating = np.issubdtype(array.dtype, np.floating)
        source = Image.fromarray(
            array.astype(np.float32 if floating else np.int32), mode="F" if floating else "I"
        )
        resized = np.asarray(source.resize(self.resized[::-1], Image.NEAREST, box=self.crop))
        return self._window(resized, np.array(fill, dtype=resized.dtype)).astype(array.dtype, copy=False)

    def apply_to_boxes(
        self, boxes: np.ndarray, min_visibility: float = 0.0, min_size: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Transforms `(x_min, y_min, x_max, y_max)` pixel boxes; returns the kept boxes and their indices.

        A box is kept when at least `min_visibility` of its transformed area lies inside the output and its visible
        width and height are at least `min_size` pixels.
        """
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        left, top, right, bottom = self.crop
        scale_x = self.resized[1] / (right - left)
        scale_y = self.resized[0] / (bottom - top)
        out_h, out_w = self.output
        x = (boxes[:, [0, 2]] - left) * scale_x - self.offset[1]
        y = (boxes[:, [1, 3]] - top) * scale_y - self.offset[0]
        full_area = (x[:, 1] - x[:, 0]) * (y[:, 1] - y[:, 0])
        x = x.clip(0, out_w)
        y = y.clip(0, out_h)
        width, height = x[:, 1] - x[:, 0], y[:, 1] - y[:, 0]
        keep = (width >= max(min_size, 1e-6)) & (height >= max(min_size, 1e-6))
        keep &= width * height >= min_visibility * full_area
        if self.flip:
            x = out_w - x[:, ::-1]
        result = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)[keep]
        return result.astype(np.float32), np.flatnonzero(keep)

    def _window(self, resized: np.ndarray, fill: np.ndarray) -> np.ndarray:
        """The output-sized window of `resized` at `offset`, `fill` where it leaves the resized crop."""
        out_h, out_w = self.output
        off_y, off_x = self.offset
        canvas = np.empty((out_h, out_w, *resized.shape[2:]), dtype=resized.dtype)
        canvas[...] = fill
        src_y0, src_y1 = max(off_y, 0), min(resized.shape[0], off_y + out_h)
        src_x0, src_x1 = max(off_x, 0), min(resized.shape[1], off_x + out_w)
        if src_y1 > src_y0 and src_x1 > src_x0:
            canvas[src_y0 - off_y : src_y1 - off_y, src_x0 - off_x : src_x1 - off_x] = resized[
                src_y0:src_y1, src_x0:src_x1
            ]
        return canvas[:, ::-1].copy() if self.flip else canvas


def resize_geometry(image_hw: tuple[int, int], output_hw: tuple[int, int]) -> Geometry:
    """The plain resize of a `(height, width)` image to `output_hw` (what evaluation uses)."""
    height, width = image_hw
    return Geometry(crop=(0, 0, width, height), resized=tuple(output_hw), output=tuple(output_hw))


def sample_geometry(
    config: AugmentConfig, image_hw: tuple[int, int], output_hw: tuple[int, int], rng: np.random.Generator
) -> Geometry:
    """Draws the training geometry of one image from `config`, using only `rng` (so a seed fixes it).

    Args:
        config ([`AugmentConfig`]): the task's augmentation.
        image_hw (`tuple[int, int]`): `(height, width)` of the source image.
        output_hw (`tuple[int, int]`): `(height, width)` of the model input.
        rng (`numpy.random.Generator`): source of randomness.
    """
    height, width = image_hw
    out_h, out_w = output_hw
    if config.geometry == "random_resized_crop":
        left, top, crop_w, crop_h = _random_crop_box(config, image_hw, out_w / out_h, rng)
        geometry = Geometry(
            crop=(left, top, left + crop_w, top + crop_h), resized=(out_h, out_w), output=(out_h, out_w)
        )
    elif config.geometry == "scale_jitter":
        factor = rng.uniform(*config.jitter_scale)
        resized_h, resized_w = max(1, round(out_h * factor)), max(1, round(out_w * factor))
        # Random placement both when cropping (window inside) and padding (crop inside the window).
        off_y = int(rng.integers(min(0, resized_h - out_h), max(0, resized_h - out_h) + 1))
        off_x = int(rng.integers(min(0, resized_w - out_w), max(0, resized_w - out_w) + 1))
        geometry = Geometry(
            crop=(0, 0, width, height),
            resized=(resized_h, resized_w),
            offset=(off_y, off_x),
            output=(out_h, out_w),
        )
    else:
        geometry = resize_geometry(image_hw, output_hw)
    return replace(geometry, flip=bool(rng.random() < config.hflip_prob))


def _random_crop_box(
    config: AugmentConfig, image_hw: tuple[int, int], output_aspect: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """`(left, top, width, height)` of a random crop with area in `crop_scale` and aspect in `crop_ratio`."""
    height, width = image_hw
    area = height * width
    # Aspect ratios are relative to the output's, so a non-square output does not systematically squash crops.
    low, high = (math.log(r * output_aspect) for r in config.crop_ratio)
    for _ in range(10):
        target_area = area * rng.uniform(*config.crop_scale)
        aspect = math.exp(rng.uniform(low, high))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    # Rejection failed (extreme source aspect): the largest centred crop within the allowed aspect range.
    aspect = width / height
    if aspect < math.exp(low):
        crop_w, crop_h = width, max(1, round(width / math.exp(low)))
    elif aspect > math.exp(high):
        crop_w, crop_h = max(1, round(height * math.exp(high))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def apply_geometry(
    sample: TaskSample,
    geometry: Geometry,
    ignore_index: int = 255,
    min_box_visibility: float = 0.0,
    min_box_size: float = 0.0,
) -> TaskSample:
    """Applies one geometry to the image and every target of `sample`.

    Masks are resampled with nearest neighbours and padded with `ignore_index`; depth with nearest neighbours and
    padded with 0 (invalid); boxes are transformed, clipped, and dropped (with their class labels) when too little
    of them remains visible.
    """
    boxes, class_labels = sample.boxes, sample.class_labels
    if boxes is not None:
        boxes, kept = geometry.apply_to_boxes(boxes, min_box_visibility, min_box_size)
        if class_labels is not None:
            class_labels = np.asarray(class_labels)[kept]
    return TaskSample(
        image=geometry.apply_to_image(sample.image),
        boxes=boxes,
        class_labels=class_labels,
        mask=None if sample.mask is None else geometry.apply_to_map(sample.mask, ignore_index),
        depth=None if sample.depth is None else geometry.apply_to_map(sample.depth, INVALID_DEPTH),
    )


def augment_sample(
    sample: TaskSample,
    config: AugmentConfig,
    output_hw: tuple[int, int],
    rng: np.random.Generator,
    ignore_index: int = 255,
) -> TaskSample:
    """A random training view of `sample` at `output_hw` (see [`sample_geometry`] and [`apply_geometry`])."""
    geometry = sample_geometry(config, sample.size_hw, output_hw, rng)
    return apply_geometry(sample, geometry, ignore_index, config.min_box_visibility, config.min_box_size)


def resize_sample(sample: TaskSample, output_hw: tuple[int, int], ignore_index: int = 255) -> TaskSample:
    """The evaluation view of `sample`: a plain resize to `output_hw`."""
    return apply_geometry(sample, resize_geometry(sample.size_hw, output_hw), ignore_index)


__all__ = [
    "GEOMETRIES",
    "AugmentConfig",
    "Geometry",
    "TaskSample",
    "apply_geometry",
    "augment_sample",
    "resize_geometry",
    "resize_sample",
    "sample_geometry",
]
