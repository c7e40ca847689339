"""ModSquadForObjectDetection: outputs, label checks, targets, post-processing, saving and loading, the stock
object-detection pipeline, and that a tiny model really learns to find boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from faster_coco_eval import COCO, COCOeval_faster
from PIL import Image, ImageDraw
from transformers import pipeline
from transformers.image_transforms import center_to_corners_format
from transformers.loss.loss_for_object_detection import box_iou

from modsquad import (
    ModSquadForObjectDetection,
    ModSquadImageProcessor,
    ModSquadObjectDetectionOutput,
)
from modsquad.model.loss_detection import detection_loss, detection_targets
from modsquad.model.processing_detection import post_process_object_detection, prepare_detection_labels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(name="det_task")
def det_task_fixture(all_tasks) -> dict:
    """The "det" task: circle (0), square (1)."""
    return all_tasks[2]


def _labels(*boxes_per_image) -> list[dict]:
    return [
        {
            "class_labels": torch.tensor([c for c, _ in objects], dtype=torch.long),
            "boxes": torch.tensor([b for _, b in objects], dtype=torch.float32).reshape(-1, 4),
        }
        for objects in boxes_per_image
    ]


def _draw_scenes(num_images: int, size: int, seed: int) -> tuple[list[Image.Image], list[dict]]:
    """Images with 1-3 non-overlapping circles (class 0) and squares (class 1) of random colours, and their COCO
    annotations (boxes in pixels)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(num_images):
        background = tuple(int(v) for v in rng.integers(0, 70, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        objects: list[dict] = []
        wanted = int(rng.integers(1, 4))
        while len(objects) < wanted:
            side = int(rng.integers(size // 4, size * 2 // 5))
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            if any(
                x < ox + ow and ox < x + side and y < oy + oh and oy < y + side
                for ox, oy, ow, oh in (o["bbox"] for o in objects)
            ):
                continue
            category = int(rng.integers(0, 2))
            colour = tuple(int(v) for v in rng.integers(130, 256, 3))
            shape = draw.ellipse if category == 0 else draw.rectangle
            shape([x, y, x + side - 1, y + side - 1], fill=colour)
            objects.append({"bbox": [x, y, side, side], "category_id": category})
        images.append(image)
        annotations.append({"image_id": image_id, "annotations": objects})
    return images, annotations


def _coco_ap(annotations: list[dict], detections: list[dict], size: int) -> tuple[float, float]:
    """COCO AP@[.5:.95] and AP50 of per-image post-processed detections (pixel xyxy boxes)."""
    ground_truth = {
        "images": [{"id": i, "width": size, "height": size} for i in range(len(annotations))],
        "annotations": [
            {
                "id": n,
                "image_id": i,
                "category_id": o["category_id"],
                "bbox": o["bbox"],
                "iscrowd": 0,
                "area": o["bbox"][2] * o["bbox"][3],
            }
            for i, entry in enumerate(annotations)
            for n, o in enumerate(entry["annotations"], start=100 * i + 1)
        ],
        "categories": [{"id": 0, "name": "circle"}, {"id": 1, "name": "square"}],
    }
    results = [
        {
            "image_id": i,
            "category_id": int(label),
            "score": float(score),
            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
        }
        for i, found in enumerate(detections)
        for score, label, b in zip(found["scores"], found["labels"], found["boxes"])
    ]
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    evaluation = COCOeval_faster(coco, coco.loadRes(results), "bbox", print_function=lambda *a, **k: None)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    return float(evaluation.stats[0]), float(evaluation.stats[1])


@pytest.fixture(scope="module")
def trained(one_thread, tiny_config, fresh_tasks):
    """A tiny detector trained for a few seconds on 8 generated 64x64 scenes resized to 32x32 by the processor."""
    torch.manual_seed(0)
    processor = ModSquadImageProcessor(size={"height": 32, "width": 32})
    images, annotations = _draw_scenes(8, size=64, seed=0)
    batch = processor(images, annotations=annotations, return_tensors="pt")
    model = ModSquadForObjectDetection(tiny_config([fresh_tasks()["det"]]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(100):
        loss = model(batch["pixel_values"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), processor, images, annotations, batch


# ----------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize(
    ("height", "width", "stride", "queries"), [(32, 32, 4, 8 * 8), (32, 48, 4, 8 * 12), (48, 32, 8, 6 * 4)]
)
def test_output_shapes_square_and_non_square(height, width, stride, queries, det_task, tiny_config):
    model = ModSquadForObjectDetection(tiny_config([{**det_task, "output_stride": stride}]))
    labels = _labels([(0, [0.3, 0.3, 0.2, 0.2]), (1, [0.7, 0.6, 0.3, 0.5])], [])
    labels[1] = {"class_labels": [], "boxes": []}  # an image without objects, as plain lists
    out = model(torch.randn(2, 3, height, width), labels=labels, output_router_logits=True)

    assert isinstance(out, ModSquadObjectDetectionOutput)
    assert out.logits.shape == (2, queries, 2)
    assert out.pred_boxes.shape == (2, queries, 4)
    corners = center_to_corners_format(out.pred_boxes)
    assert corners.min() >= 0 and corners.max() <= 1
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert set(out.loss_dict) == {"loss_heatmap", "loss_giou"}
    assert out.router_logits and out.aux_loss is not None
    assert out.hidden_states is None  # the head reads them, but returns them only when asked
    out.loss.backward()
    assert model.heads["det"].box_distances[-1].weight.grad.abs().sum() > 0
    assert model.modsquad.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0


def test_loss_is_the_heads_own_not_detrs_hungarian_loss(monkeypatch, det_task, tiny_config):
    # Transformers maps "...ForObjectDetection" to DETR's Hungarian loss: it must never be reached.
    def no_stock_loss(self):
        raise AssertionError("the stock loss_function was used")

    monkeypatch.setattr(ModSquadForObjectDetection, "loss_function", property(no_stock_loss))
    model = ModSquadForObjectDetection(tiny_config([det_task], balance_loss_coef=0.1)).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    labels = _labels([(1, [0.5, 0.5, 0.25, 0.25])], [(0, [0.25, 0.75, 0.5, 0.4])])
    out = model(pixel_values, labels=labels, output_hidden_states=True, output_router_logits=True)
    predictions = model.head(
        model.modsquad(pixel_values, task="det", output_hidden_states=True), pixel_values
    )
    expected, _ = detection_loss(
        predictions["heatmap"], predictions["boxes_xyxy"], labels, 4, (32, 32), 1.0, 2.0
    )
    torch.testing.assert_close(out.loss, expected + out.aux_loss)
    assert len(out.hidden_states) == 5


def test_bad_task_options_raise(det_task, tiny_config):
    with pytest.raises(ValueError, match=r"output_stride=3 must divide patch_size=8.*\[1, 2, 4, 8\]"):
        ModSquadForObjectDetection(tiny_config([{**det_task, "output_stride": 3}]))
    with pytest.raises(ValueError, match="head_channels must be a positive int, got 0"):
        ModSquadForObjectDetection(tiny_config([{**det_task, "head_channels": 0}]))


# -------------------------------------------------------------------------------------------- bad labels
GOOD = {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (GOOD, "must be a list with one dict per image"),
        ([GOOD], "labels for 1 images, but the batch has 2"),
        ([GOOD, torch.zeros(1, 4)], r"labels\[1\] must be a dict"),
        ([GOOD, {"boxes": torch.zeros(0, 4)}], r"labels\[1\] lacks \['class_labels'\]"),
        (
            [GOOD, {"class_labels": torch.tensor([0]), "boxes": torch.tensor([0.5, 0.5, 0.2, 0.2])}],
            r"labels\[1\]\['boxes'\] must have shape \(num_boxes, 4\), got \(4,\)",
        ),
        (
            [GOOD, {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}],
            r"labels\[1\]\['class_labels'\] must be 1 integer class ids",
        ),
        (
            [GOOD, {"class_labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}],
            r"labels\[1\]\['class_labels'\] holds \[2\]; accepted ids are 0..1",
        ),
        (
            [GOOD, {"class_labels": torch.tensor([-1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}],
            r"holds \[-1\]",
        ),
        (
            [GOOD, {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.2]])}],
            r"labels\[1\]\['boxes'\] has degenerate boxes \[\[0.5, 0.5, 0.0, 0.2",
        ),
        (
            [GOOD, {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.9, 0.5, 0.4, 0.2]])}],
            r"labels\[1\]\['boxes'\] has boxes \[\[0.9.*outside the image",
        ),
        (
            [GOOD, {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[40.0, 30.0, 8.0, 8.0]])}],
            "outside the image",
        ),
    ],
)
def test_bad_labels_raise_naming_image_and_value(labels, message, det_task, tiny_config):
    model = ModSquadForObjectDetection(tiny_config([det_task]))
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, 32, 32), labels=labels)


# ----------------------------------------------------------------------------------------------- targets
def test_targets_peak_at_centres_and_give_shared_cells_to_the_smaller_box():
    # An 8x8 map (32 px, stride 4): a big square around (16, 16) px and a small one inside its lower right part.
    classes = torch.tensor([1, 0])
    boxes = torch.tensor([[0.5, 0.5, 0.75, 0.75], [0.72, 0.72, 0.16, 0.16]])
    heatmap, box_targets, box_weights = detection_targets(classes, boxes, 2, (8, 8), (32, 32), stride=4)

    heatmap = heatmap.view(2, 8, 8)
    assert heatmap[1, 4, 4] == 1 and heatmap[0, 5, 5] == 1  # centres 16 px -> cell 4, 23.04 px -> cell 5
    assert (heatmap == 1).sum() == 2 and heatmap.max() <= 1
    assert heatmap[1, 4, 3] < 1 and heatmap[1, 4, 3] > heatmap[1, 4, 1]  # Gaussian falls off from the centre
    assert heatmap[0, :, :3].max() < 1e-3  # class 0 is far from the left edge
    # the small box owns its centre cell even though the big box also covers it
    torch.testing.assert_close(box_targets.view(8, 8, 4)[5, 5], center_to_corners_format(boxes[1]))
    torch.testing.assert_close(box_targets.view(8, 8, 4)[4, 4], center_to_corners_format(boxes[0]))
    # each object's regression weights sum to one, so big objects do not outweigh small ones
    owners = (box_targets == center_to_corners_format(boxes[1])).all(-1)
    torch.testing.assert_close(box_weights[owners].sum(), torch.tensor(1.0))
    torch.testing.assert_close(box_weights.sum(), torch.tensor(2.0))

    empty = detection_targets(classes[:0], boxes[:0], 2, (8, 8), (32, 32), stride=4)
    assert all(t.abs().sum() == 0 for t in empty)


# ------------------------------------------------------------------------------------------ post-process
def _outputs(scores: list[list[float]], boxes: list[list[float]]) -> ModSquadObjectDetectionOutput:
    """A one-image output whose sigmoid scores are `scores` (queries x classes)."""
    probabilities = torch.tensor([scores])
    return ModSquadObjectDetectionOutput(
        logits=torch.log(probabilities / (1 - probabilities)), pred_boxes=torch.tensor([boxes])
    )


def test_post_process_threshold_sizes_top_k_and_nms():
    outputs = _outputs(
        [[0.9, 0.1], [0.2, 0.8], [0.85, 0.3], [0.4, 0.05]],
        [[0.25, 0.5, 0.5, 0.5], [0.75, 0.25, 0.2, 0.1], [0.26, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]],
    )
    processor = ModSquadImageProcessor()
    (found,) = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(100, 200)])
    # query 2 duplicates query 0 (same class, IoU ~0.96) and is suppressed; query 3 is under the threshold
    torch.testing.assert_close(found["scores"], torch.tensor([0.9, 0.8]))
    assert found["labels"].tolist() == [0, 1]
    torch.testing.assert_close(
        found["boxes"], torch.tensor([[0.0, 25.0, 100.0, 75.0], [130.0, 20.0, 170.0, 30.0]])
    )

    (normalised,) = post_process_object_detection(outputs, threshold=0.3, nms_threshold=None)
    assert normalised["labels"].tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(normalised["boxes"][0], torch.tensor([0.0, 0.25, 0.5, 0.75]))
    (top,) = post_process_object_detection(outputs, threshold=0.0, top_k=2, nms_threshold=None)
    torch.testing.assert_close(top["scores"], torch.tensor([0.9, 0.85]))
    # a tensor of sizes, as the pipeline passes it
    (same,) = post_process_object_detection(outputs, 0.5, torch.IntTensor([[100, 200]]))
    torch.testing.assert_close(same["boxes"], found["boxes"])


def test_post_process_keeps_heatmap_peaks_only():
    # a 1 x 4 map, one class: cells 0 and 1 belong to one object (1 is its peak), cell 3 is a weaker second object
    heatmap = torch.logit(torch.tensor([0.6, 0.9, 0.2, 0.5])).view(1, 1, 1, 4)
    boxes = torch.tensor([[[0.125, 0.5, 0.25, 1.0], [0.375, 0.5, 0.25, 1.0], [0.625, 0.5, 0.25, 1.0],
                           [0.875, 0.5, 0.25, 1.0]]])  # fmt: skip
    outputs = ModSquadObjectDetectionOutput(
        logits=heatmap.flatten(2).transpose(1, 2), pred_boxes=boxes, heatmap=heatmap
    )
    (peaks,) = post_process_object_detection(outputs, threshold=0.0, top_k=2, nms_threshold=None)
    torch.testing.assert_close(peaks["scores"], torch.tensor([0.9, 0.5]))
    (cells,) = post_process_object_detection(
        outputs, threshold=0.0, top_k=2, nms_threshold=None, peak_kernel=None
    )
    torch.testing.assert_close(cells["scores"], torch.tensor([0.9, 0.6]))
    with pytest.raises(ValueError, match="peak_kernel must be an odd positive int or None, got 2"):
        post_process_object_detection(outputs, peak_kernel=2)


def test_post_process_rejects_bad_arguments():
    outputs = _outputs([[0.9, 0.1]], [[0.5, 0.5, 0.2, 0.2]])
    with pytest.raises(
        ValueError, match=r"one \(height, width\) per image, i.e. shape \(1, 2\); got shape \(2, 2\)"
    ):
        post_process_object_detection(outputs, target_sizes=[(10, 10), (20, 20)])
    with pytest.raises(ValueError, match="top_k must be a positive int, got 0"):
        post_process_object_detection(outputs, top_k=0)
    with pytest.raises(ValueError, match=r"pred_boxes \(batch_size, num_queries, 4\)"):
        post_process_object_detection({"logits": torch.zeros(1, 3, 2), "pred_boxes": torch.zeros(1, 2, 4)})


def test_prepare_labels_clips_drops_slivers_and_checks_categories():
    sizes = [(20, 40)]
    (labels,) = prepare_detection_labels(
        [
            [
                {"bbox": [-0.5, 2, 10.5, 4], "category_id": np.int64(1)},
                {"bbox": [-0.8, 0, 0.6, 5], "category_id": 0},
            ]
        ],
        sizes,
    )
    # the first box is clipped at x=0; the second lies wholly in the tolerated overshoot and is dropped
    assert labels["class_labels"].tolist() == [1]
    torch.testing.assert_close(labels["boxes"], torch.tensor([[0.125, 0.2, 0.25, 0.2]]))
    for category in ("cat", 1.5, -1):
        with pytest.raises(ValueError, match=rf"annotations\[0\]: category_id .* got {category!r}"):
            prepare_detection_labels([[{"bbox": [0, 0, 4, 4], "category_id": category}]], sizes)


# ------------------------------------------------------------------------------------ saving and loading
# ------------------------------------------------------------------------------------ saving and loading
def test_a_saved_folder_ships_the_modules_the_head_imports(det_task, tiny_config, tmp_path):
    """(Saving, loading and remote code of every head: tests/model/test_head_contract.py.)"""
    ModSquadForObjectDetection(tiny_config([det_task])).save_pretrained(tmp_path)
    assert {"head_detection.py", "loss_detection.py", "box_ops.py"} <= {p.name for p in tmp_path.iterdir()}


# --------------------------------------------------------------------------------------------- learning
@pytest.mark.slow
def test_tiny_model_learns_to_find_the_boxes(trained):
    model, processor, _, annotations, batch = trained
    with torch.no_grad():
        outputs = model(batch["pixel_values"])
    detections = processor.post_process_object_detection(outputs, threshold=0.05, target_sizes=[(64, 64)] * 8)
    ap, ap50 = _coco_ap(annotations, detections, size=64)
    assert ap50 > 0.9, f"AP50={ap50:.3f} (AP={ap:.3f})"


@pytest.mark.slow
def test_stock_pipeline_on_a_saved_folder(trained, tmp_path):
    model, processor, images, annotations, _ = trained
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)

    detector = pipeline("object-detection", model=str(tmp_path))
    found = detector(images[0], threshold=0.5)
    assert found and all(set(d) == {"score", "label", "box"} for d in found)
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)
    # boxes come back in pixels of the 64x64 input (the model saw it at 32x32), with the config's label names
    truth = annotations[0]["annotations"]
    true_xyxy = torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in (o["bbox"] for o in truth)], dtype=torch.float
    )
    for obj, xyxy in zip(truth, true_xyxy):
        best = max(found, key=lambda d: box_iou(xyxy[None], _box_tensor(d["box"]))[0][0, 0])
        assert box_iou(xyxy[None], _box_tensor(best["box"]))[0][0, 0] > 0.5
        assert best["label"] == ("circle", "square")[obj["category_id"]]
    assert all(0 <= d["box"]["xmin"] < d["box"]["xmax"] <= 64 for d in found)


def _box_tensor(box: dict) -> torch.Tensor:
    return torch.tensor([[box["xmin"], box["ymin"], box["xmax"], box["ymax"]]], dtype=torch.float)
