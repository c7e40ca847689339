"""Augmentations keep the image, boxes, masks and depth aligned; they are reproducible for a seed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from modsquad.data.transforms import (
    AugmentConfig,
    Geometry,
    TaskSample,
    apply_geometry,
    augment_sample,
    resize_sample,
    sample_geometry,
)


def rectangle_scene(box=(20, 12, 44, 30), size=(48, 64)) -> TaskSample:
    """A black image with one white rectangle covering pixels [x0, x1) x [y0, y1), its box, mask and depth."""
    height, width = size
    image = Image.new("RGB", (width, height), (0, 0, 0))
    x0, y0, x1, y1 = box
    ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))
    mask = np.zeros(size, dtype=np.int64)
    mask[y0:y1, x0:x1] = 1
    mask[:2] = 255  # an ignored band must stay ignored
    depth = np.full(size, 3.0, dtype=np.float32)
    depth[y0:y1, x0:x1] = 1.5
    depth[-3:, :5] = 0.0  # a sensor hole
    return TaskSample(
        image=image,
        boxes=np.array([box], dtype=np.float32),
        class_labels=np.array([1]),
        mask=mask,
        depth=depth,
    )


def test_flip_mirrors_box():
    sample = rectangle_scene()
    geometry = Geometry(crop=(0, 0, 64, 48), resized=(48, 64), output=(48, 64), flip=True)
    boxes, kept = geometry.apply_to_boxes(sample.boxes)
    np.testing.assert_allclose(boxes, [[64 - 44, 12, 64 - 20, 30]])
    assert kept.tolist() == [0]
    flipped = np.asarray(geometry.apply_to_image(sample.image))[..., 0]
    xs = np.nonzero(flipped > 127)[1]
    assert (xs.min(), xs.max() + 1) == (20, 44)


@pytest.mark.parametrize("geometry", ["random_resized_crop", "scale_jitter"])
def test_box_stays_on_drawn_pixels(geometry):
    config = AugmentConfig(
        geometry=geometry, crop_scale=(0.3, 1.0), jitter_scale=(0.6, 1.6), min_box_visibility=0.0
    )
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        sample = rectangle_scene()
        out = augment_sample(sample, config, (40, 40), rng)
        bright = np.asarray(out.image)[..., 0] > 127
        if not bright.any():
            assert len(out.boxes) == 0 or (out.boxes[:, 2:] - out.boxes[:, :2]).min() < 1.5
            continue
        assert len(out.boxes) == 1
        x0, y0, x1, y1 = out.boxes[0]
        ys, xs = np.nonzero(bright)
        # Within a pixel of the drawn rectangle on every side (resampling blurs edges by less than that).
        assert x0 - 1 <= xs.min() <= x0 + 1 and x1 - 1 <= xs.max() + 1 <= x1 + 1
        assert y0 - 1 <= ys.min() <= y0 + 1 and y1 - 1 <= ys.max() + 1 <= y1 + 1
        # The mask moved with the image.
        assert (out.mask[bright] == 1).mean() > 0.9
        checked += 1
    assert checked > 20


def test_masks_and_depth_keep_their_values():
    config = AugmentConfig(geometry="scale_jitter", jitter_scale=(0.5, 0.7), hflip_prob=1.0)
    out = augment_sample(rectangle_scene(), config, (48, 64), np.random.default_rng(3), ignore_index=255)
    assert out.mask.dtype == np.int64 and out.mask.shape == (48, 64)
    assert set(np.unique(out.mask).tolist()) <= {0, 1, 255}
    assert out.depth.dtype == np.float32
    assert set(np.unique(out.depth).tolist()) <= {0.0, 1.5, 3.0}
    # Zoomed out by at most 0.7: at least that much padding, ignored in the mask and invalid in the depth.
    padding = 48 * 64 * (1 - 0.7**2)
    assert (out.mask == 255).sum() >= padding and (out.depth == 0).sum() >= padding


def test_padding_is_ignored_and_invalid():
    # Zoom out by exactly one half, window at the top left: the right and bottom halves are padding.
    geometry = Geometry(crop=(0, 0, 64, 48), resized=(24, 32), output=(48, 64))
    sample = rectangle_scene()
    mask = geometry.apply_to_map(sample.mask, 255)
    depth = geometry.apply_to_map(sample.depth, 0.0)
    assert (mask[24:] == 255).all() and (mask[:, 32:] == 255).all()
    assert (depth[24:] == 0).all() and (depth[:, 32:] == 0).all()
    assert (depth[:24, :32] > 0).mean() > 0.9
    boxes, _ = geometry.apply_to_boxes(sample.boxes)
    np.testing.assert_allclose(boxes, [[10, 6, 22, 15]])


def test_cut_away_box_is_dropped_with_its_label():
    sample = rectangle_scene(box=(2, 20, 8, 28))
    sample.boxes = np.array([[2, 20, 8, 28], [30, 10, 60, 40]], dtype=np.float32)
    sample.class_labels = np.array([0, 1])
    # Keep only the right half of the image.
    geometry = Geometry(crop=(32, 0, 64, 48), resized=(48, 32), output=(48, 32))
    config = AugmentConfig()
    out = apply_geometry(sample, geometry, 255, config.min_box_visibility, config.min_box_size)
    assert out.class_labels.tolist() == [1]
    np.testing.assert_allclose(out.boxes, [[0, 10, 28, 40]])


def test_same_seed_same_view_and_different_seed_differs():
    config = AugmentConfig.for_task_type("image-classification")

    def view(seed):
        out = augment_sample(rectangle_scene(), config, (32, 32), np.random.default_rng(seed))
        return np.asarray(out.image), out.boxes, out.mask

    first, again, other = view(7), view(7), view(8)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_random_resized_crop_respects_area_and_aspect():
    config = AugmentConfig(crop_scale=(0.35, 1.0), crop_ratio=(0.75, 4 / 3))
    rng = np.random.default_rng(0)
    for _ in range(100):
        geometry = sample_geometry(config, (100, 200), (32, 32), rng)
        left, top, right, bottom = geometry.crop
        assert 0 <= left < right <= 200 and 0 <= top < bottom <= 100
        assert 0.3 <= (right - left) * (bottom - top) / 20000 <= 1.0
        assert 0.7 <= (right - left) / (bottom - top) <= 1.4


def test_eval_resize_is_plain():
    out = resize_sample(rectangle_scene(), (24, 32))
    assert out.image.size == (32, 24)
    np.testing.assert_allclose(out.boxes, [[10, 6, 22, 15]])
    assert out.mask.shape == (24, 32) and out.depth.shape == (24, 32)


def test_task_type_defaults_and_validation():
    assert AugmentConfig.for_task_type("image-classification").crop_scale == (0.35, 1.0)
    assert AugmentConfig.for_task_type("object-detection").geometry == "scale_jitter"
    assert AugmentConfig.for_task_type("depth-estimation", hflip_prob=0.0).hflip_prob == 0.0
    assert AugmentConfig(crop_scale=[0.5, 1]).crop_scale == (0.5, 1.0)
    with pytest.raises(ValueError, match="geometry='rotate'"):
        AugmentConfig(geometry="rotate")
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="hflip_prob"):
        AugmentConfig(hflip_prob=2)
    with pytest.raises(ValueError, match="unknown task type"):
        AugmentConfig.for_task_type("captioning")
