"""ModSquadImageProcessor: accepted input kinds agree, colour conversion, size and normalisation, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modsquad import ModSquadImageProcessor

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


@pytest.fixture
def processor() -> ModSquadImageProcessor:
    return ModSquadImageProcessor(size={"height": 32, "width": 32})


@pytest.fixture
def rgb() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)


def _pixels(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def test_pil_numpy_and_torch_inputs_give_the_same_pixel_values(processor, rgb):
    reference = _pixels(processor, Image.fromarray(rgb))
    assert reference.shape == (1, 3, 32, 32)
    assert reference.dtype == torch.float32
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    same = {
        "numpy HWC": rgb,
        "numpy CHW": chw,
        "torch CHW": torch.from_numpy(chw),
        "torch HWC": torch.from_numpy(rgb),
        "list": [rgb],
    }
    for kind, image in same.items():
        assert torch.allclose(_pixels(processor, image), reference, atol=1e-6), kind


def test_a_list_is_a_batch_in_order(processor, rgb):
    other = np.ascontiguousarray(rgb[::-1])
    batch = _pixels(processor, [Image.fromarray(rgb), other])
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[0], _pixels(processor, rgb)[0])
    assert torch.allclose(batch[1], _pixels(processor, other)[0])
    # images of different sizes are resized to the one output size
    mixed = _pixels(processor, [rgb, rgb[:20, :30]])
    assert mixed.shape == (2, 3, 32, 32)


def _unnormalise(pixel_values: torch.Tensor) -> np.ndarray:
    """Back to [0, 255] per channel."""
    return (pixel_values[0].numpy() * STD[:, None, None] + MEAN[:, None, None]) * 255.0


@pytest.mark.parametrize("as_array", [False, True], ids=["PIL L", "numpy HW"])
def test_grey_images_become_three_equal_channels(processor, rgb, as_array):
    grey = rgb[..., 0]
    pixels = _pixels(processor, grey if as_array else Image.fromarray(grey, mode="L"))
    assert pixels.shape == (1, 3, 32, 32)
    channels = _unnormalise(pixels)
    assert np.allclose(channels[0], channels[1], atol=1e-3)
    assert np.allclose(channels[0], channels[2], atol=1e-3)
    if as_array:  # the same grey image either way
        assert torch.allclose(pixels, _pixels(processor, Image.fromarray(grey, mode="L")), atol=1e-6)


@pytest.mark.parametrize("as_array", [False, True], ids=["PIL RGBA", "numpy RGBA"])
def test_rgba_drops_the_alpha_channel(processor, rgb, as_array):
    rgba = np.concatenate([rgb, np.full((40, 48, 1), 255, dtype=np.uint8)], axis=-1)
    pixels = _pixels(processor, rgba if as_array else Image.fromarray(rgba, mode="RGBA"))
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels, _pixels(processor, rgb), atol=1e-5)


def test_output_size_and_normalisation():
    processor = ModSquadImageProcessor(size={"height": 24, "width": 40})
    colour = np.array([255, 0, 128], dtype=np.uint8)
    flat = np.broadcast_to(colour, (50, 30, 3)).copy()
    pixels = _pixels(processor, flat)
    assert pixels.shape == (1, 3, 24, 40)
    expected = (colour / 255.0 - MEAN) / STD
    for channel in range(3):
        assert torch.allclose(
            pixels[0, channel], torch.tensor(expected[channel], dtype=torch.float32), atol=1e-5
        )

    # resizing is a bilinear resize of the image, then the same normalisation
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 30, 3), dtype=np.uint8))
    resized = np.asarray(image.resize((40, 24), Image.BILINEAR), dtype=np.float64) / 255.0
    expected = torch.from_numpy(((resized - MEAN) / STD).transpose(2, 0, 1)).float()
    assert torch.allclose(_pixels(processor, image)[0], expected, atol=1e-4)

    # the steps can be switched off: no resize, no normalisation -> the [0, 1] image itself
    raw = _pixels(processor, image, do_resize=False, do_normalize=False)
    assert raw.shape == (1, 3, 50, 30)
    assert torch.allclose(raw[0], torch.from_numpy(np.asarray(image).transpose(2, 0, 1) / 255.0).float())


def test_defaults_are_imagenet_at_224():
    pixels = _pixels(ModSquadImageProcessor(), np.zeros((10, 10, 3), dtype=np.uint8))
    assert pixels.shape == (1, 3, 224, 224)
    assert torch.allclose(pixels[0, :, 0, 0], torch.tensor(-MEAN / STD, dtype=torch.float32), atol=1e-5)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("photo.png", r"no image file at 'photo.png'; pass a path to an image file, an http\(s\) URL"),
        (["photo.png"], r"no image file at 'photo.png'"),
        (None, r"unsupported image type NoneType"),
        ([], r"no images given"),
        (np.zeros((32, 32, 2), dtype=np.uint8), r"unsupported image shape \(32, 32, 2\).*C in 1, 3, 4"),
        (
            np.zeros((2, 32, 32, 3), dtype=np.uint8),
            r"unsupported image shape \(2, 32, 32, 3\).*list of images",
        ),
        (torch.zeros(2, 3, 32, 32), r"unsupported image shape \(2, 3, 32, 32\)"),
        (Image.new("I;16", (32, 32)), r"unsupported PIL image mode 'I;16'.*'RGB'"),
        (Image.new("F", (32, 32)), r"unsupported PIL image mode 'F'.*'RGB'"),
    ],
    ids=["path", "list of paths", "None", "empty list", "2 channels", "4-D array", "4-D tensor", "I;16", "F"],
)
def test_unsupported_input_raises_value_error(processor, image, message):
    with pytest.raises(ValueError, match=message):
        processor(image, return_tensors="pt")


def test_save_and_load_keeps_the_settings(tmp_path):
    processor = ModSquadImageProcessor(
        size={"height": 24, "width": 40}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    processor.save_pretrained(tmp_path)
    loaded = ModSquadImageProcessor.from_pretrained(tmp_path)
    image = np.random.default_rng(2).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert loaded.size == {"height": 24, "width": 40}
    assert torch.equal(_pixels(loaded, image), _pixels(processor, image))
