"""`modsquad evaluate`, `evaluate_model` and the Hub dataset schemas, on tiny models and generated datasets."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from modsquad import ModSquadForImageClassification, ModSquadForMultiTask, ModSquadImageProcessor
from modsquad.cli import main
from modsquad.data import load_split, parse_columns, task_schema
from modsquad.metrics.evaluation import evaluate_model

SIZES = [
    (40, 48),
    (32, 32),
    (36, 30),
    (44, 40),
    (32, 40),
    (30, 36),
]  # (height, width): evaluation is per original size


def _images(seed: int = 0, sizes=SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _processor() -> ModSquadImageProcessor:
    return ModSquadImageProcessor(size={"height": 32, "width": 32})


def _run_cli(capsys, *args) -> tuple[dict, str]:
    out_path = args[args.index("--json") + 1]
    assert main(["evaluate", *args]) == 0
    printed = capsys.readouterr().out
    with open(out_path) as handle:
        return json.load(handle), printed


@pytest.fixture(scope="module")
def multitask_checkpoint(tmp_path_factory, tiny_config, fresh_tasks):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("multitask")
    ModSquadForMultiTask(tiny_config(tasks=list(fresh_tasks().values()))).save_pretrained(folder)
    _processor().save_pretrained(folder)
    return str(folder)


# ------------------------------------------------------------------------------------------------ classification
def test_evaluate_cli_classification_accuracy_matches_the_models_predictions(tmp_path, capsys, tiny_config):
    model = ModSquadForImageClassification(tiny_config()).eval()
    processor = _processor()
    model.save_pretrained(tmp_path / "ckpt")
    processor.save_pretrained(tmp_path / "ckpt")
    images = _images()
    with torch.no_grad():
        predicted = model(**processor(images=images, return_tensors="pt")).logits.argmax(-1).tolist()
    # Four rows labelled with the model's own prediction, two with another class: accuracy 4/6 by construction.
    labels = predicted[:4] + [(p + 1) % 3 for p in predicted[4:]]
    features = datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["circle", "square", "triangle"])}
    )
    datasets.Dataset.from_dict({"img": images, "y": labels}, features=features).to_parquet(
        tmp_path / "val.parquet"
    )

    args = [
        str(tmp_path / "ckpt"),
        "--dataset",
        str(tmp_path / "val.parquet"),
        "--columns",
        "image=img,label=y",
    ]
    report, printed = _run_cli(capsys, *args, "--batch-size", "4", "--json", str(tmp_path / "m.json"))
    # Three classes: top-5 accuracy would be 1 whatever the model does, so it is not reported.
    assert report["metrics"] == pytest.approx({"accuracy": 4 / 6})
    assert (report["task"], report["split"], report["num_samples"]) == ("cls", "validation", 6)
    assert "accuracy  0.6667" in printed and "top5" not in printed

    report, _ = _run_cli(capsys, *args, "--max-samples", "3", "--json", str(tmp_path / "m3.json"))
    assert report["metrics"]["accuracy"] == 1.0 and report["num_samples"] == 3


@pytest.mark.slow
def test_multitask_model_evaluates_like_the_single_task_model(multitask_checkpoint):
    dataset = datasets.Dataset.from_dict({"image": _images(1)[:4], "label": [0, 1, 2, 0]})
    multitask = ModSquadForMultiTask.from_pretrained(multitask_checkpoint)
    single = ModSquadForImageClassification.from_pretrained(multitask_checkpoint, task="cls")
    processor = _processor()
    expected = evaluate_model(single, processor, dataset, batch_size=3)
    assert evaluate_model(multitask, processor, dataset, task="cls", batch_size=2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="several tasks"):
        evaluate_model(multitask, processor, dataset)
    with pytest.raises(ValueError, match="reduce_labels applies to semantic-segmentation"):
        evaluate_model(single, processor, dataset, reduce_labels=True)


# ------------------------------------------------------------------------------------------------ dense tasks
@pytest.mark.slow
def test_evaluate_cli_segmentation_scores_at_the_original_size(multitask_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(2)
    images = _images(2, SIZES[:3])
    # scene_parse_150 style: 0 = "other" (ignored with --reduce-labels), 1..2 = the task's classes 0..1.
    annotations = [rng.integers(0, 3, (im.height, im.width), dtype=np.uint8) for im in images]
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image()})
    rows = {"image": images, "annotation": [Image.fromarray(a, mode="L") for a in annotations]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "seg.parquet")

    report, printed = _run_cli(
        capsys,
        *[
            multitask_checkpoint,
            "--task",
            "seg",
            "--dataset",
            str(tmp_path / "seg.parquet"),
            "--reduce-labels",
        ],
        *["--json", str(tmp_path / "seg.json")],
    )
    metrics = report["metrics"]
    assert set(metrics) == {
        "mean_iou",
        "mean_accuracy",
        "overall_accuracy",
        "iou_background",
        "iou_shape",
        "accuracy_background",
        "accuracy_shape",
    }
    assert all(0.0 <= value <= 1.0 for value in metrics.values())
    assert "iou_shape" in printed

    # Pixel accuracy by hand: predictions resized to each original size, reference 0 ignored.
    model = ModSquadForMultiTask.from_pretrained(multitask_checkpoint).eval()
    processor = _processor()
    correct = counted = 0
    for image, annotation in zip(images, annotations):
        with torch.no_grad():
            outputs = model(processor(images=[image], return_tensors="pt")["pixel_values"], task="seg")
        predicted = processor.post_process_semantic_segmentation(outputs, target_sizes=[annotation.shape])[
            0
        ].numpy()
        keep = annotation > 0
        correct += int((predicted[keep] == annotation[keep] - 1).sum())
        counted += int(keep.sum())
    assert metrics["overall_accuracy"] == pytest.approx(correct / counted)


def test_evaluate_cli_detection(multitask_checkpoint, tmp_path, capsys):
    images = _images(3, SIZES[:3])
    # objects as a list of dicts (datasets' List of a struct); one image without objects.
    objects = [
        [{"bbox": [2.0, 3.0, 20.0, 16.0], "category": 0}],
        [],
        [{"bbox": [5.0, 5.0, 12.0, 14.0], "category": 1}, {"bbox": [0.0, 0.0, 6.0, 8.0], "category": 0}],
    ]
    datasets.Dataset.from_dict({"image": images, "objects": objects}).to_parquet(tmp_path / "det.parquet")
    report, _ = _run_cli(
        capsys,
        *[multitask_checkpoint, "--task", "det", "--dataset", str(tmp_path / "det.parquet")],
        *["--json", str(tmp_path / "det.json")],
    )
    metrics = report["metrics"]
    assert {"map", "map_50", "map_75", "map_small", "mar_1", "mar_10", "mar_100"} <= set(metrics)
    # All boxes are small (< 32^2 px): the size-bucket values are undefined (-1), the others in [0, 1].
    assert metrics["map_large"] == -1.0
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("map", "map_50", "map_75", "mar_100"))
    assert metrics["map_50"] >= metrics["map"] and metrics["map_small"] == pytest.approx(metrics["map"])


def test_evaluate_cli_depth(multitask_checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(4)
    images = _images(4, SIZES[:3])
    depth_maps = []
    for image in images:
        depth = rng.uniform(0.5, 6.0, (image.height, image.width)).astype(np.float32)
        depth[:3, :3] = 0.0  # a sensor hole
        depth_maps.append(Image.fromarray(depth, mode="F"))
    features = datasets.Features({"image": datasets.Image(), "depth_map": datasets.Image()})
    datasets.Dataset.from_dict({"image": images, "depth_map": depth_maps}, features=features).to_parquet(
        tmp_path / "depth.parquet"
    )
    report, _ = _run_cli(
        capsys,
        *[multitask_checkpoint, "--task", "depth", "--dataset", str(tmp_path / "depth.parquet")],
        *["--max-depth", "5", "--json", str(tmp_path / "depth.json")],
    )
    metrics = report["metrics"]
    assert set(metrics) == {"abs_rel", "rmse", "delta1", "delta2", "delta3"}
    assert metrics["abs_rel"] > 0 and metrics["rmse"] > 0
    assert 0.0 <= metrics["delta1"] <= metrics["delta2"] <= metrics["delta3"] <= 1.0


def test_evaluate_cli_needs_a_task_for_a_multitask_checkpoint(multitask_checkpoint, tmp_path, capsys):
    assert main(["evaluate", multitask_checkpoint, "--dataset", str(tmp_path / "any.parquet")]) == 2
    assert "has tasks ['cls', 'seg', 'det', 'depth']; pick one with --task" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ schemas
def test_detection_schema_reads_both_object_layouts_and_feeds_the_processor():
    image = Image.new("RGB", (40, 30))
    as_lists = {"bbox": [[2, 3, 10, 5], [0, 0, 4, 4]], "category": [1, 0]}
    as_dicts = [{"bbox": [2, 3, 10, 5], "category": 1}, {"bbox": [0, 0, 4, 4], "category": 0}]
    schema = task_schema("object-detection")
    for objects in (as_lists, as_dicts):
        (reference,) = schema.references({"image": [image], "objects": [objects]})
        np.testing.assert_allclose(reference["boxes"], [[2, 3, 12, 8], [0, 0, 4, 4]])  # COCO xywh -> xyxy
        assert reference["labels"].tolist() == [1, 0]
    # A list of rows (a DataLoader's batch) works too, and the targets are what the processor takes.
    images, targets = schema.processor_inputs([{"image": image, "objects": as_dicts}])
    labels = _processor()(images=images, **targets)["labels"]
    assert labels[0]["class_labels"].tolist() == [1, 0]
    # xyxy datasets, and objects whose keys have other names.
    schema = task_schema("object-detection", columns={"category": "label"}, bbox_format="xyxy")
    (reference,) = schema.references({"image": [image], "objects": [{"bbox": [[2, 3, 12, 8]], "label": [1]}]})
    np.testing.assert_allclose(reference["boxes"], [[2, 3, 12, 8]])
    with pytest.raises(ValueError, match=r"objects lack keys \['label'\]; they have \['bbox', 'category'\]"):
        schema.references({"image": [image], "objects": [as_lists]})


def test_schema_errors_name_the_missing_column_and_the_fix():
    schema = task_schema("image-classification", columns="image=img")
    with pytest.raises(ValueError) as error:
        schema.references({"img": [Image.new("RGB", (4, 4))], "y": [0]})
    message = str(error.value)
    assert "reads column 'label' (role 'label')" in message and "['img', 'y']" in message
    assert "--columns label=<column>" in message
    with pytest.raises(
        ValueError, match=r"unknown column roles \['labels'\].*accepted roles: \['image', 'label'\]"
    ):
        task_schema("image-classification", columns={"labels": "y"})
    with pytest.raises(ValueError, match=r"options \['reduce_labels'\] do not apply to depth-estimation"):
        task_schema("depth-estimation", reduce_labels=True)
    with pytest.raises(ValueError, match="must look like role=column"):
        parse_columns("image")
    with pytest.raises(ValueError, match="labels must be int class ids"):
        schema.references({"img": [Image.new("RGB", (4, 4))], "label": ["cat"]})


def test_segmentation_and_depth_schemas():
    image = Image.new("RGB", (3, 2))
    annotation = Image.fromarray(np.array([[0, 1, 2], [255, 2, 1]], dtype=np.uint8), mode="L")
    (reduced,) = task_schema("semantic-segmentation", reduce_labels=True).references(
        {"image": [image], "annotation": [annotation]}
    )
    assert reduced.tolist() == [[255, 0, 1], [255, 1, 0]]
    with pytest.raises(ValueError, match="must be a 2-D map"):
        task_schema("semantic-segmentation").references({"image": [image], "annotation": [image]})
    with pytest.raises(ValueError, match="is 2x3 but its image is 4x4"):
        task_schema("semantic-segmentation").references(
            {"image": [Image.new("RGB", (4, 4))], "annotation": [annotation]}
        )
    depth = np.array([[1.5, 0.0, np.nan], [-1.0, np.inf, 2.0]], dtype=np.float32)
    _, targets = task_schema("depth-estimation").processor_inputs({"image": [image], "depth_map": [depth]})
    assert targets["depth_maps"][0].tolist() == [[1.5, 0.0, 0.0], [0.0, 0.0, 2.0]]


def test_load_split_reads_saved_folders_and_single_files(tmp_path):
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"x": [1, 2]}), "test": datasets.Dataset.from_dict({"x": [3]})}
    )
    splits.save_to_disk(tmp_path / "saved")
    assert load_split(str(tmp_path / "saved"), split="test")["x"] == [3]
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\], not 'validation'"):
        load_split(str(tmp_path / "saved"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown data file extension '\.txt'"):
        load_split(str(tmp_path / "notes.txt"))
