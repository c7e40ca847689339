"""The synthetic demo benchmark: Hub schemas, correct annotations, determinism, Parquet round trip."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from modsquad import ModSquadConfig
from modsquad.data import demo_task_configs, load_task_dataset, make_demo_datasets, save_demo_datasets


@pytest.fixture(scope="module")
def demo():
    return make_demo_datasets(num_train=24, num_val=8, image_size=48, seed=0)


def pixels(dataset, index, column="image"):
    return np.asarray(dataset[index][column])


def test_tasks_splits_and_features(demo):
    assert set(demo) == {"cls", "det", "seg", "depth"}
    for splits in demo.values():
        assert isinstance(splits, datasets.DatasetDict)
        assert len(splits["train"]) == 24 and len(splits["validation"]) == 8
        assert isinstance(splits["train"].features["image"], datasets.Image)
    tasks = {t["name"]: t for t in demo_task_configs()}
    assert demo["cls"]["train"].features["label"].names == tasks["cls"]["labels"]
    objects = demo["det"]["train"].features["objects"]
    assert objects["category"].feature.names == tasks["det"]["labels"]
    assert objects["bbox"].feature.length == 4
    assert isinstance(demo["seg"]["train"].features["annotation"], datasets.Image)
    assert isinstance(demo["depth"]["train"].features["depth_map"], datasets.Image)
    # The task entries make a valid model config.
    assert ModSquadConfig(tasks=demo_task_configs()).task_names == ["cls", "det", "seg", "depth"]


def test_annotations_describe_the_images(demo):
    labels = [row["label"] for row in demo["cls"]["train"]]
    assert len(set(labels)) >= 3  # classes vary
    for row in demo["det"]["train"]:
        boxes = np.asarray(row["objects"]["bbox"])
        assert 1 <= len(boxes) <= 3 and len(row["objects"]["category"]) == len(boxes)
        assert (boxes[:, 2:] > 0).all() and (boxes[:, :2] >= 0).all()
        assert (boxes[:, 0] + boxes[:, 2] <= 48).all() and (boxes[:, 1] + boxes[:, 3] <= 48).all()
        # The area is the drawn pixels, which fill a good part of their tight box.
        fill = np.asarray(row["objects"]["area"]) / (boxes[:, 2] * boxes[:, 3])
        assert ((fill > 0.3) & (fill <= 1.0)).all()
    for index in range(8):
        annotation = pixels(demo["seg"]["train"], index, "annotation")
        assert annotation.shape == (48, 48) and annotation.dtype == np.uint8
        assert set(np.unique(annotation).tolist()) <= {0, 1, 2, 3} and (annotation > 0).any()
    holes = 0
    for index in range(24):
        depth = pixels(demo["depth"]["train"], index, "depth_map")
        assert depth.dtype == np.float32 and depth.shape == (48, 48)
        valid = depth > 0
        assert (depth[valid] >= 1.0).all() and (depth[valid] <= 10.0).all()
        holes += int((~valid).any())
        # The ground recedes towards the horizon: the bottom row is nearer than the top one.
        assert np.median(depth[-1][valid[-1]]) < np.median(depth[0][valid[0]])
    assert holes > 0  # some sensor holes, marked invalid


def test_same_seed_same_data_tasks_and_seeds_differ(demo):
    again = make_demo_datasets(num_train=30, num_val=2, image_size=48, seed=0)
    for task in demo:
        # Row i depends only on (seed, task, split, i): more rows only append.
        np.testing.assert_array_equal(pixels(demo[task]["train"], 5), pixels(again[task]["train"], 5))
    images = [pixels(demo[task]["train"], 0) for task in demo]
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1 :])
    other = make_demo_datasets(num_train=1, num_val=1, image_size=48, seed=1, tasks=["cls"])
    assert list(other) == ["cls"]
    assert not np.array_equal(pixels(other["cls"]["train"], 0), pixels(demo["cls"]["train"], 0))
    assert not np.array_equal(pixels(demo["cls"]["train"], 0), pixels(demo["cls"]["validation"], 0))


def test_parquet_round_trip_is_identical(tmp_path, demo):
    written = save_demo_datasets(tmp_path, demo)
    assert written["seg"]["validation"] == tmp_path / "seg" / "validation.parquet"
    for task, splits in demo.items():
        loaded = load_task_dataset(tmp_path / task)
        for split, original in splits.items():
            assert loaded[split].features == original.features
            for column, feature in original.features.items():
                if isinstance(feature, datasets.Image):
                    for index in (0, len(original) - 1):
                        np.testing.assert_array_equal(
                            pixels(loaded[split], index, column), pixels(original, index, column)
                        )
                else:
                    assert loaded[split][column] == original[column]


def test_bad_arguments_raise(tmp_path, demo):
    with pytest.raises(ValueError, match="num_train must be an int >= 1"):
        make_demo_datasets(num_train=0)
    with pytest.raises(ValueError, match="image_size must be an int >= 32"):
        make_demo_datasets(image_size=16)
    with pytest.raises(ValueError, match="demo task names"):
        make_demo_datasets(tasks=["classification"])
    with pytest.raises(ValueError, match="either datasets or generation arguments"):
        save_demo_datasets(tmp_path, demo, seed=3)
