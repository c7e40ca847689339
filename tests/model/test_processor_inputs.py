"""The image processor takes what Transformers' processors take: image paths and file URLs, Segformer's
`do_reduce_labels`, and DETR's COCO detection annotations, with the same results as those processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

from modsquad import ModSquadImageProcessor


@pytest.fixture
def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))


def test_paths_and_file_urls_give_the_pixels_of_the_opened_image(tmp_path, picture):
    path = tmp_path / "scene one.png"
    picture.save(path)
    processor = ModSquadImageProcessor(size={"height": 24, "width": 32})
    expected = processor(picture, return_tensors="pt")["pixel_values"]
    for given in (str(path), path, path.as_uri(), [str(path)]):
        torch.testing.assert_close(processor(given, return_tensors="pt")["pixel_values"], expected)
    # Maps may be files too: read as stored (ids kept, no RGB conversion).
    Image.fromarray(np.full((30, 40), 3, dtype=np.uint8)).save(tmp_path / "mask.png")
    labels = processor(path, segmentation_maps=[tmp_path / "mask.png"], return_tensors="pt")["labels"]
    assert labels.unique().tolist() == [3]
    with pytest.raises(ValueError, match=r"no image file at '.*missing.png'"):
        processor(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match=r"segmentation_maps\[0\]: no map file"):
        processor(path, segmentation_maps=[tmp_path / "missing.png"])


def test_do_reduce_labels_matches_segformers_processor(picture):
    label_map = np.random.default_rng(1).integers(0, 5, (30, 40)).astype(np.uint8)
    segformer = SegformerImageProcessorPil(size={"height": 12, "width": 16}, do_reduce_labels=True)
    expected = segformer(picture, segmentation_maps=Image.fromarray(label_map), return_tensors="pt")["labels"]
    ours = ModSquadImageProcessor(size={"height": 12, "width": 16}, do_reduce_labels=True)
    got = ours(picture, segmentation_maps=label_map, return_tensors="pt")["labels"]
    torch.testing.assert_close(got, expected)
    assert 255 in got.unique().tolist() and got.max() == 255 and got[got != 255].max() == 3  # 0 -> ignored
    # Per call, as Transformers' processors take their options; saved with the processor.
    plain = ours(picture, segmentation_maps=label_map, do_reduce_labels=False, return_tensors="pt")["labels"]
    assert plain.max() == 4 and 255 not in plain.unique().tolist()
    assert ours.to_dict()["do_reduce_labels"] is True


def test_coco_annotations_give_detrs_labels(picture, tmp_path):
    annotations = {
        "image_id": 7,
        "annotations": [
            {"bbox": [2.5, 3, 10, 8], "category_id": 1, "area": 60.0, "iscrowd": 0},
            {"bbox": [0, 0, 4, 4], "category_id": 0, "area": 16.0, "iscrowd": 1},  # a crowd: left out
            {"bbox": [30, 20, 10, 10], "category_id": 2, "area": 70.0, "iscrowd": 0},
        ],
    }
    detr = DetrImageProcessorPil(size={"height": 24, "width": 32}, do_pad=False)
    (expected,) = detr(images=picture, annotations=annotations, return_tensors="pt")["labels"]
    (got,) = ModSquadImageProcessor(size={"height": 24, "width": 32})(
        images=picture, annotations=annotations, return_tensors="pt"
    )["labels"]
    assert (
        set(got)
        == set(expected)
        == {"image_id", "class_labels", "boxes", "area", "iscrowd", "orig_size", "size"}
    )
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    # Without `area`, the clipped box's area (in processed pixels); a bare object list has no image_id.
    (plain,) = ModSquadImageProcessor(size={"height": 15, "width": 20})(
        images=picture, annotations=[[{"bbox": [0, 0, 10, 8], "category_id": 0}]], return_tensors="pt"
    )["labels"]
    assert plain["area"].tolist() == [pytest.approx(80 / 4)] and "image_id" not in plain
    with pytest.raises(ValueError, match=r"iscrowd must be 0 or 1, got 2"):
        ModSquadImageProcessor()(
            picture, annotations=[[{"bbox": [0, 0, 4, 4], "category_id": 0, "iscrowd": 2}]]
        )


def test_detection_model_trains_on_labels_with_detrs_extra_fields(tiny_config, picture):
    from modsquad import ModSquadForObjectDetection

    model = ModSquadForObjectDetection(
        tiny_config([{"name": "det", "type": "object-detection", "num_labels": 3}])
    )
    processor = ModSquadImageProcessor(size={"height": 32, "width": 32})
    annotations = {"image_id": 1, "annotations": [{"bbox": [2, 3, 10, 8], "category_id": 1, "area": 80.0}]}
    batch = processor(images=picture, annotations=annotations, return_tensors="pt")
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
