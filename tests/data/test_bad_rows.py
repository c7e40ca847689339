"""Rows that cannot be right are refused with the dataset row named; in training they are skipped and counted up to
`training.max_bad_rows` (ten in a row stop the run at once); depth units follow one documented rule."""

from __future__ import annotations

import io
import math

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modsquad import ModSquadConfig, ModSquadForImageClassification
from modsquad.commands.train import train_recipe
from modsquad.data.adapter import TaskDataAdapter
from modsquad.data.batching import AdaptedDataset, BadRowError, build_task_dataloader
from modsquad.data.schemas import task_schema
from modsquad.metrics import MeanAveragePrecision
from modsquad.metrics.evaluation import evaluate_model
from modsquad.model.image_processing_modsquad import ModSquadImageProcessor
from modsquad.training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

PROCESSOR = ModSquadImageProcessor(size={"height": 16, "width": 16})
DEPTH = {"name": "depth", "type": "depth-estimation", "max_depth": 10.0}
CLS = {"name": "cls", "type": "image-classification", "labels": ["a", "b"]}


def png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def image(height: int = 12, width: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))


def classification_rows(num_rows: int, corrupt: tuple[int, ...] = ()) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rng = np.random.default_rng(0)
    images = [
        {"bytes": b"not an image", "path": None}
        if i in corrupt
        else png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
        for i in range(num_rows)
    ]
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(num_rows)]}, features)


# -------------------------------------------------------------------------------------------------- depth units
def test_integer_depth_maps_are_millimetres_and_floats_metres():
    adapter = TaskDataAdapter(DEPTH, PROCESSOR, train=False, image_size=16)
    millimetres = Image.fromarray(np.full((12, 16), 2500, dtype=np.uint16))  # NYU raw style, mode I;16
    assert millimetres.mode == "I;16"
    assert adapter({"image": image(), "depth_map": millimetres})["labels"].max().item() == pytest.approx(2.5)
    metres = np.full((12, 16), 2.5, dtype=np.float32)
    assert adapter({"image": image(), "depth_map": metres})["labels"].max().item() == pytest.approx(2.5)
    # KITTI stores metres x 256 in uint16 PNGs: depth_scale says so.
    kitti = TaskDataAdapter({**DEPTH, "depth_scale": 1 / 256}, PROCESSOR, train=False, image_size=16)
    stored = np.full((12, 16), 640, dtype=np.uint16)
    assert kitti({"image": image(), "depth_map": stored})["labels"].max().item() == pytest.approx(2.5)
    schema = task_schema("depth-estimation", depth_scale=0.001)
    assert schema.references([{"image": image(), "depth_map": stored}])[0].max() == pytest.approx(0.64)
    with pytest.raises(ValueError, match="depth_scale must be a finite number > 0"):
        task_schema("depth-estimation", depth_scale=-1)
    with pytest.raises(ValueError, match="depth_scale must be a positive number"):
        ModSquadConfig(tasks=[{**DEPTH, "depth_scale": 0}])


@pytest.mark.parametrize(
    ("depth_map", "message"),
    [
        (np.zeros((12, 16), dtype=np.float32), "row 7: the depth map has no valid pixel"),
        (np.full((12, 16), np.nan, dtype=np.float32), "row 7: the depth map has no valid pixel"),
        # millimetres stored as floats: read as metres, far beyond max_depth
        (np.full((12, 16), 2500.0, dtype=np.float32), "row 7: the depth map reaches 2500 m"),
    ],
)
def test_depth_maps_that_cannot_be_right_are_refused_naming_the_row(depth_map, message):
    adapter = TaskDataAdapter(DEPTH, PROCESSOR, train=True, image_size=16)
    with pytest.raises(ValueError) as error:
        adapter({"image": image(), "depth_map": depth_map}, index=7)
    assert message in str(error.value)
    if "reaches" in message:
        assert "depth_scale" in str(error.value) and "max_depth=10" in str(error.value)


def test_an_all_zero_depth_set_stops_training_instead_of_training_on_a_zero_loss():
    rows = [{"image": image(), "depth_map": np.zeros((12, 16), dtype=np.float32)} for _ in range(12)]
    adapted = AdaptedDataset(
        rows, TaskDataAdapter(DEPTH, PROCESSOR, train=True, image_size=16), skip_bad_rows=True
    )
    with pytest.raises(BadRowError, match=r"10 bad rows in a row \(0, 1, .*no valid pixel"):
        adapted[(0, 1)]


# --------------------------------------------------------------------------------------- images and annotations
@pytest.mark.parametrize(
    ("stored", "message"),
    [
        (Image.new("RGB", (0, 0)), "empty image: 0x0"),
        (np.zeros((0, 16, 3), dtype=np.uint8), "empty image: shape (0, 16, 3)"),
        (np.full((12, 16, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((12, 16, 3), np.inf, dtype=np.float32), "NaN or infinite"),
    ],
)
def test_empty_and_non_finite_images_are_refused(stored, message):
    adapter = TaskDataAdapter(CLS, PROCESSOR, train=True, image_size=16)
    with pytest.raises(ValueError, match=rf"row 3: .*{message}".replace("(", r"\(").replace(")", r"\)")):
        adapter({"image": stored, "label": 0}, index=3)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PROCESSOR(images=[stored], return_tensors="pt")


def test_nan_boxes_are_refused_everywhere_they_enter():
    nan_box = [float("nan"), 1.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="non-finite"):
        PROCESSOR(
            images=[image()],
            annotations=[{"image_id": 0, "annotations": [{"bbox": nan_box, "category_id": 0}]}],
            return_tensors="pt",
        )
    schema = task_schema("object-detection")
    with pytest.raises(ValueError, match=r"row 5: boxes .* non-finite"):
        schema.references([{"image": image(), "objects": {"bbox": [nan_box], "category": [0]}}], start=5)
    metric = MeanAveragePrecision()
    with pytest.raises(ValueError, match="boxes must be finite"):
        metric.compute(
            predictions=[{"boxes": [[1, 1, 5, 5]], "scores": [0.9], "labels": [0]}],
            references=[{"boxes": [nan_box], "labels": [0]}],
        )


def test_multi_label_targets_outside_zero_one_are_refused():
    task = {**CLS, "problem_type": "multi_label_classification"}
    config = ModSquadConfig(
        tasks=[task], hidden_size=8, num_hidden_layers=2, num_attention_heads=2, patch_size=8, image_size=16,
        num_experts=2, num_experts_per_tok=1, expert_intermediate_size=8,
    )  # fmt: skip
    model = ModSquadForImageClassification(config)
    pixels = torch.randn(1, 3, 16, 16)
    for bad in ([[2.0, 0.0]], [[-1.0, 1.0]], [[math.nan, 0.0]]):
        with pytest.raises(ValueError, match=r"multi-label targets must be .* in \[0, 1\]"):
            model(pixels, labels=torch.tensor(bad))
    assert torch.isfinite(model(pixels, labels=torch.tensor([[0.0, 1.0]])).loss)
    adapter = TaskDataAdapter(task, PROCESSOR, train=True, image_size=16)
    with pytest.raises(ValueError, match=r"row 2: .*class ids \[5\] are out of range"):
        adapter({"image": image(), "label": [0, 5]}, index=2)


# ------------------------------------------------------------------------------------------------- corrupt rows
def test_a_corrupt_image_is_named_by_its_dataset_row():
    rows = classification_rows(6, corrupt=(3,))
    adapter = TaskDataAdapter(CLS, PROCESSOR, train=True, image_size=16)
    with pytest.raises(BadRowError, match=r"task 'cls': row 3 cannot be read: UnidentifiedImageError"):
        next(iter(build_task_dataloader(rows, adapter, batch_size=6, shuffle=False)))
    # with skipping, the row is replaced by the next good one and reported with the batch
    adapted = AdaptedDataset(rows, adapter, skip_bad_rows=True)
    sample = adapted[(3, 0)]
    assert sample["pixel_values"].shape == (3, 16, 16)
    [(row, reason)] = sample["skipped_rows"]
    assert row == 3 and "row 3 cannot be read" in reason


def test_evaluation_names_the_dataset_row_not_the_row_of_its_batch(tiny_config):
    config = tiny_config([{"name": "cls", "type": "image-classification", "labels": ["a", "b"]}])
    model = ModSquadForImageClassification(config)
    rows = classification_rows(6, corrupt=(5,))
    with pytest.raises(ValueError, match=r"rows 4\.\.5 of the evaluation data cannot be read"):
        evaluate_model(model, PROCESSOR, rows, batch_size=2)
    detector = tiny_config([{"name": "det", "type": "object-detection", "labels": ["a", "b"]}])
    from modsquad import ModSquadForObjectDetection

    objects = [{"bbox": [[1.0, 1.0, 4.0, 4.0]], "category": [c]} for c in (0, 1, 0, 7)]
    det_rows = datasets.Dataset.from_dict({"image": [image() for _ in range(4)], "objects": objects})
    with pytest.raises(ValueError, match=r"class ids \[7\] are out of range; the detector has 2 classes"):
        evaluate_model(ModSquadForObjectDetection(detector), PROCESSOR, det_rows, batch_size=2)


# --------------------------------------------------------------------------------------- in a training run
def _recipe(tmp_path, data_path, **training):
    model = {
        "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8, "num_experts": 2,
        "num_experts_per_tok": 1, "expert_intermediate_size": 16, "moe_layers": "all",
    }  # fmt: skip
    return load_recipe(
        output_dir=str(tmp_path / "run"),
        model={"config": model},
        tasks=[
            {
                **CLS,
                "dataset": {"path": str(data_path)},
                "eval_split": None,
                "batch_size": 4,
                "image_size": 16,
            }
        ],
        training={
            "max_steps": 2,
            "tracker": "none",
            "cpu": True,
            "eval_at_end": False,
            "log_every": 1,
            **training,
        },
    )


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_skips_and_counts_a_corrupt_row_then_stops_beyond_max_bad_rows(tmp_path, capsys):
    data = tmp_path / "data"
    datasets.DatasetDict({"train": classification_rows(8, corrupt=(3,))}).save_to_disk(str(data))
    result = train_recipe(_recipe(tmp_path / "a", data))
    assert result.step == 2
    assert "skipped a bad training row (task 'cls': row 3 cannot be read" in capsys.readouterr().err

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(BadRowError, match=r"task 'cls': row 3 cannot be read"):
        train_recipe(_recipe(tmp_path / "b", data, max_bad_rows=0))

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    two_bad = tmp_path / "two_bad"
    datasets.DatasetDict({"train": classification_rows(8, corrupt=(1, 6))}).save_to_disk(str(two_bad))
    with pytest.raises(BadRowError, match=r"skipped 2 bad training rows, more than training.max_bad_rows=1"):
        train_recipe(_recipe(tmp_path / "c", two_bad, max_bad_rows=1))
