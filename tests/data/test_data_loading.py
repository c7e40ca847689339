"""From a dataset in its Hub schema to model batches: loading, row adapters, reproducible DataLoaders."""

from __future__ import annotations

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from modsquad import (
    ModSquadForDepthEstimation,
    ModSquadForImageClassification,
    ModSquadForObjectDetection,
    ModSquadForSemanticSegmentation,
    ModSquadImageProcessor,
)
from modsquad.data import (
    AugmentConfig,
    TaskDataAdapter,
    build_task_dataloader,
    load_task_dataset,
    make_demo_datasets,
    save_demo_datasets,
)


@pytest.fixture(scope="module")
def demo():
    return make_demo_datasets(num_train=16, num_val=4, image_size=48, seed=1)


@pytest.fixture(scope="module")
def processor():
    return ModSquadImageProcessor(size={"height": 32, "width": 32})


def image(height=40, width=60, value=90):
    return Image.new("RGB", (width, height), (value, value, value))


def det_row(objects):
    return {"image": image(), "objects": objects}


# ------------------------------------------------------------------------------------------------ loading
def test_parquet_file_folder_and_stream(tmp_path, demo):
    save_demo_datasets(tmp_path, demo)
    single = load_task_dataset(tmp_path / "cls" / "validation.parquet", split="validation")
    assert isinstance(single, datasets.Dataset) and len(single) == 4
    assert list(load_task_dataset(tmp_path / "cls" / "validation.parquet")) == ["train"]
    assert single.features == demo["cls"]["validation"].features
    splits = load_task_dataset(tmp_path / "det")
    assert set(splits) == {"train", "validation"}
    assert splits["train"][3]["objects"] == demo["det"]["train"][3]["objects"]
    stream = load_task_dataset(path=str(tmp_path / "depth"), split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    first = next(iter(stream))
    np.testing.assert_array_equal(
        np.asarray(first["depth_map"]), np.asarray(demo["depth"]["train"][0]["depth_map"])
    )


def test_plain_pyarrow_parquet_gets_image_features(tmp_path):
    # What a script without `datasets` writes: images as {bytes, path} structs, no HF metadata.
    buffer = __import__("io").BytesIO()
    image(8, 8).save(buffer, format="PNG")
    table = pa.table({"image": [{"bytes": buffer.getvalue(), "path": None}], "label": [1]})
    pq.write_table(table, tmp_path / "train.parquet")
    dataset = load_task_dataset(tmp_path, split="train")
    assert isinstance(dataset.features["image"], datasets.Image)
    assert dataset[0]["image"].size == (8, 8)


def test_load_task_dataset_rejects_bad_input(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown data file extension '\.txt'"):
        load_task_dataset(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="path_or_id must be"):
        load_task_dataset()


# ------------------------------------------------------------------------------------------------ adapters
@pytest.mark.parametrize("train", [True, False])
def test_adapter_formats_every_task_type(demo, processor, train, all_tasks):
    expected = {
        "cls": (torch.int64, ()),
        "seg": (torch.int64, (24, 40)),
        "depth": (torch.float32, (24, 40)),
    }
    for entry, name in ((all_tasks[0], "cls"), (all_tasks[1], "seg"), (all_tasks[3], "depth")):
        task = {**entry, "labels": demo_labels(name)} if "labels" in entry else entry
        adapter = TaskDataAdapter(task, processor, train=train, image_size=(24, 40))
        sample = adapter(demo[name]["train"][0])
        assert sample["pixel_values"].shape == (3, 24, 40) and sample["pixel_values"].dtype == torch.float32
        dtype, shape = expected[name]
        assert sample["labels"].dtype == dtype and tuple(sample["labels"].shape) == shape
    adapter = TaskDataAdapter({**all_tasks[2], "labels": demo_labels("det")}, processor, train=train)
    labels = adapter(demo["det"]["train"][0])["labels"]
    assert labels["class_labels"].dtype == torch.int64 and labels["boxes"].shape == (
        len(labels["class_labels"]),
        4,
    )
    assert ((labels["boxes"] >= 0) & (labels["boxes"] <= 1)).all()


def demo_labels(name):
    from modsquad.data import demo_task_configs

    return next(t for t in demo_task_configs() if t["name"] == name).get("labels")


def test_eval_detection_boxes_match_the_annotation(processor, all_tasks):
    adapter = TaskDataAdapter(all_tasks[2], processor, train=False)
    # Both layouts of `objects`: a dict of lists (Sequence feature) and a list of dicts (List feature).
    for objects in (
        {"bbox": [[6, 4, 30, 20]], "category": [1]},
        [{"bbox": [6, 4, 30, 20], "category": 1}],
    ):
        labels = adapter(det_row(objects))["labels"]
        assert labels["class_labels"].tolist() == [1]
        np.testing.assert_allclose(labels["boxes"][0], [21 / 60, 14 / 40, 30 / 60, 20 / 40], atol=1e-6)
    xyxy = TaskDataAdapter(all_tasks[2], processor, train=False, schema_options={"bbox_format": "xyxy"})
    from_entry = TaskDataAdapter({**all_tasks[2], "bbox_format": "xyxy"}, processor, train=False)
    for adapter in (xyxy, from_entry):
        labels = adapter(det_row({"bbox": [[6, 4, 36, 24]], "category": [1]}))["labels"]
        np.testing.assert_allclose(labels["boxes"][0], [21 / 60, 14 / 40, 30 / 60, 20 / 40], atol=1e-6)


def test_invalid_annotations_raise(processor, all_tasks):
    det = TaskDataAdapter(all_tasks[2], processor, train=True)
    with pytest.raises(ValueError, match="invalid box"):
        det(det_row({"bbox": [[6, 4, 0, 20]], "category": [0]}))
    with pytest.raises(ValueError, match="outside the 60x40 image"):
        det(det_row({"bbox": [[50, 4, 30, 20]], "category": [0]}))
    with pytest.raises(ValueError, match=r"object categories \[5\] are out of range"):
        det(det_row({"bbox": [[6, 4, 10, 10]], "category": [5]}))
    cls = TaskDataAdapter(all_tasks[0], processor, train=False)
    with pytest.raises(ValueError, match=r"class id \[3\] are out of range; this task has 3 classes"):
        cls({"image": image(), "label": 3})
    seg = TaskDataAdapter(all_tasks[1], processor, train=False)
    with pytest.raises(ValueError, match="reduce_labels"):
        seg({"image": image(), "annotation": Image.fromarray(np.full((40, 60), 2, np.uint8))})
    with pytest.raises(ValueError, match="'type'"):
        TaskDataAdapter({"name": "x", "type": "captioning"}, processor, train=True)
    with pytest.raises(ValueError, match="not a fixed height and width"):
        TaskDataAdapter(all_tasks[0], ModSquadImageProcessor(size={"shortest_edge": 32}), train=True)


def test_segmentation_reduce_labels_and_padding(processor, all_tasks):
    annotation = np.zeros((40, 60), np.uint8)
    annotation[10:30, 20:40] = 2  # scene_parse_150 style: 0 = unlabelled, classes from 1
    row = {"image": image(), "annotation": Image.fromarray(annotation)}
    reduce = {"reduce_labels": True}
    adapter = TaskDataAdapter(all_tasks[1], processor, train=False, schema_options=reduce)
    assert set(adapter(row)["labels"].unique().tolist()) == {1, 255}
    # Zooming out pads; padding is ignored, never background.
    zoom_out = AugmentConfig(geometry="scale_jitter", jitter_scale=(0.5, 0.5), hflip_prob=0.0)
    padded = TaskDataAdapter(all_tasks[1], processor, train=True, augment=zoom_out, schema_options=reduce)(
        row
    )["labels"]
    assert (padded == 255).float().mean() > 0.7 and (padded == 1).any()


def test_boxes_cut_away_by_augmentation_are_dropped(processor, all_tasks):
    # One box at the far left, one large in the middle: crops often lose the first, never make a degenerate box.
    adapter = TaskDataAdapter(
        all_tasks[2],
        processor,
        train=True,
        augment={"geometry": "random_resized_crop", "crop_scale": (0.2, 0.4)},
    )
    row = det_row({"bbox": [[0, 0, 4, 4], [15, 10, 30, 20]], "category": [0, 1]})
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(30):
        labels = adapter(row, rng=rng)["labels"]
        assert len(labels["class_labels"]) == len(labels["boxes"])
        assert (labels["boxes"][:, 2:] > 0).all()
        counts.add(len(labels["class_labels"]))
    assert 1 in counts or 0 in counts


def test_multi_label_classification(processor, all_tasks):
    task = {**all_tasks[0], "problem_type": "multi_label_classification"}
    adapter = TaskDataAdapter(task, processor, train=False)
    labels = adapter({"image": image(), "label": [0, 2]})["labels"]
    assert labels.tolist() == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------------ loaders
def batches(loader):
    return [(b["pixel_values"], b["labels"]) for b in loader]


def test_same_seed_same_batches_and_epochs_differ(demo, processor, all_tasks):
    adapter = TaskDataAdapter({**all_tasks[0], "labels": demo_labels("cls")}, processor, train=True)
    first = build_task_dataloader(demo["cls"]["train"], adapter, batch_size=4, seed=3)
    second = build_task_dataloader(demo["cls"]["train"], adapter, batch_size=4, seed=3)
    epoch_a, epoch_b = batches(first), batches(second)
    assert len(epoch_a) == 4
    for (pa_, la), (pb, lb) in zip(epoch_a, epoch_b):
        assert torch.equal(pa_, pb) and torch.equal(la, lb)
    next_epoch = batches(first)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(epoch_a, next_epoch))
    other = batches(build_task_dataloader(demo["cls"]["train"], adapter, batch_size=4, seed=4))
    assert not torch.equal(other[0][0], epoch_a[0][0])
    # Global RNG seeding fixes `seed=None` loaders (the trainer's per-epoch seeding).
    torch.manual_seed(11)
    none_a = batches(build_task_dataloader(demo["cls"]["train"], adapter, batch_size=4, seed=None))
    torch.manual_seed(11)
    none_b = batches(build_task_dataloader(demo["cls"]["train"], adapter, batch_size=4, seed=None))
    assert torch.equal(none_a[0][0], none_b[0][0])


def test_workers_do_not_change_the_batches(demo, processor, all_tasks):
    adapter = TaskDataAdapter({**all_tasks[1], "labels": demo_labels("seg")}, processor, train=True)
    alone = batches(build_task_dataloader(demo["seg"]["train"], adapter, batch_size=8, seed=5))
    workers = batches(
        build_task_dataloader(demo["seg"]["train"], adapter, batch_size=8, seed=5, num_workers=2)
    )
    for (pa_, la), (pb, lb) in zip(alone, workers):
        assert torch.equal(pa_, pb) and torch.equal(la, lb)


def test_streaming_loader_is_reproducible(demo, processor, all_tasks):
    stream = demo["depth"]["train"].to_iterable_dataset(num_shards=2)
    adapter = TaskDataAdapter(all_tasks[3], processor, train=True)

    def run():
        loader = build_task_dataloader(stream, adapter, batch_size=5, seed=2, buffer_size=8)
        return batches(loader)

    a, b = run(), run()
    assert len(a) == 3  # 16 rows, drop_last
    for (pa_, la), (pb, lb) in zip(a, b):
        assert torch.equal(pa_, pb) and torch.equal(la, lb)
    assert a[0][1].dtype == torch.float32 and a[0][1].shape == (5, 32, 32)


def test_batches_train_the_heads(demo, processor, tiny_config):
    """Loader batches are what the heads take: a forward with labels gives a finite loss for every task type."""
    models = {
        "cls": ModSquadForImageClassification,
        "det": ModSquadForObjectDetection,
        "seg": ModSquadForSemanticSegmentation,
        "depth": ModSquadForDepthEstimation,
    }
    from modsquad.data import demo_task_configs

    # Narrow decoders keep the dense heads fast on a CPU.
    narrow = {"object-detection": {"head_channels": 16}, "image-classification": {}}
    for task in demo_task_configs():
        options = narrow.get(task["type"], {"decoder_channels": 16})
        model = models[task["name"]](tiny_config(tasks=[{**task, **options}]))
        adapter = TaskDataAdapter(task, processor, train=True)
        batch = next(iter(build_task_dataloader(demo[task["name"]]["train"], adapter, batch_size=4)))
        if task["name"] == "det":
            assert isinstance(batch["labels"], list) and len(batch["labels"]) == 4
        elif task["name"] == "cls":
            assert batch["labels"].shape == (4,) and batch["labels"].dtype == torch.int64
        else:
            assert batch["labels"].shape == (4, 32, 32)
        with torch.no_grad():
            output = model(**batch)
        assert torch.isfinite(output.loss), task["name"]
