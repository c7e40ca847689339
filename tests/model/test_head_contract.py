"""The contract every single-task head model keeps, checked once over the four heads: it saves and loads back
through its Transformers Auto class (and as remote code), serves one task out of a multi-task checkpoint, runs in
its stock pipeline, and a head missing from the checkpoint it loads from is initialised, not left as empty memory.

The facts of each head (its model class, Auto class, pipeline tag) come from the head class itself
(`task_head_class`); what is specific to a head (its loss, label checks, post-processing, learning) is tested in
its own file."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import pipeline
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from modsquad import ModSquadForMultiTask, ModSquadImageProcessor
from modsquad.model.modeling_heads import TASK_HEADS, task_head_class

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_TYPES = ["image-classification", "semantic-segmentation", "object-detection", "depth-estimation"]
# The output fields that carry each head type's predictions.
PREDICTIONS = {
    "image-classification": ("logits",),
    "semantic-segmentation": ("logits",),
    "object-detection": ("logits", "pred_boxes"),
    "depth-estimation": ("predicted_depth",),
}


def test_the_contract_covers_every_registered_head():
    assert set(TASK_HEADS) == set(TASK_TYPES) == set(PREDICTIONS)


@pytest.fixture(params=TASK_TYPES)
def task_type(request) -> str:
    return request.param


@pytest.fixture(name="head")
def head_fixture(task_type):
    """The head class of the task type: its `model_class`, `auto_class` and `pipeline_tag`."""
    return task_head_class(task_type)


@pytest.fixture(name="tasks")
def tasks_fixture(small_tasks) -> dict[str, dict]:
    """The four tasks by type, with small dense heads (and a task option of the depth head's own)."""
    small_tasks["depth"]["max_depth"] = 20.0
    return {task["type"]: task for task in small_tasks.values()}


@pytest.fixture(name="no_prompt", autouse=True)
def no_prompt_fixture(monkeypatch):
    """Transformers asks on stdin before running remote code; loading a head model with the package installed never
    asks."""

    def prompt(*args, **kwargs):
        raise AssertionError(f"an interactive prompt was shown: {args[0] if args else ''}")

    monkeypatch.setattr(builtins, "input", prompt)


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32)


def _assert_same_predictions(task_type: str, got, expected, exact: bool = False) -> None:
    for field in PREDICTIONS[task_type]:
        if exact:
            assert torch.equal(getattr(got, field), getattr(expected, field)), field
        else:
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), msg=field)


def _expected_labels(task: dict) -> dict[int, str] | None:
    return dict(enumerate(task["labels"])) if "labels" in task else None


# ------------------------------------------------------------------------------------ saving and loading
def test_save_load_round_trip_and_auto_class(head, task_type, tasks, tiny_config, tmp_path):
    model = head.model_class(tiny_config([tasks[task_type]])).eval()
    model.save_pretrained(tmp_path)
    auto_class = getattr(transformers, head.auto_class)

    loaded = auto_class.from_pretrained(tmp_path).eval()
    assert type(loaded) is head.model_class
    assert type(head.model_class.from_pretrained(tmp_path)) is head.model_class
    assert type(auto_class.from_config(loaded.config)) is head.model_class
    if (labels := _expected_labels(tasks[task_type])) is not None:
        assert loaded.config.id2label == labels
    pixel_values = _images()
    with torch.no_grad():
        expected = model(pixel_values)
        _assert_same_predictions(task_type, loaded(pixel_values), expected, exact=True)

    # The folder also loads as remote code: the flat modules the head imports travel with it.
    module = loaded.config.auto_map[head.auto_class]
    assert module.endswith(f".{head.model_class.__name__}")
    assert f"{module.split('.')[0]}.py" in {p.name for p in tmp_path.iterdir()}
    # (the Auto class prefers the installed package, so import the folder's copy the way remote code is imported)
    remote_class = get_class_from_dynamic_module(module, str(tmp_path))
    assert remote_class is not head.model_class
    remote = remote_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        _assert_same_predictions(task_type, remote(pixel_values), expected)


# ------------------------------------------------------------------------- one task of a multi-task checkpoint
def test_loads_one_task_out_of_a_multi_task_checkpoint(head, task_type, tasks, tiny_config, tmp_path):
    task = tasks[task_type]
    name = task["name"]
    second = {**task, "name": f"{name}2"}
    if "labels" in task:
        second["labels"] = ["a", "b", "c"]
    entries = [*tasks.values(), second]
    multi = ModSquadForMultiTask(tiny_config(entries)).eval()
    multi.save_pretrained(tmp_path)
    pixel_values = _images()

    for entry in (task, second):
        model = head.model_class.from_pretrained(tmp_path, task=entry["name"]).eval()
        assert model.task == entry["name"] and list(model.heads) == [entry["name"]]
        served = model.config.get_task(entry["name"])
        assert {key: served[key] for key in entry if key != "labels"} == {
            key: value for key, value in entry.items() if key != "labels"
        }  # the task's options come along (e.g. the depth head's max_depth)
        if (labels := _expected_labels(entry)) is not None:
            assert model.config.id2label == labels
        with torch.no_grad():
            _assert_same_predictions(task_type, model(pixel_values), multi(pixel_values, task=entry["name"]))

    with pytest.raises(ValueError, match=rf"several {task_type} tasks \['{name}', '{name}2'\]"):
        head.model_class.from_pretrained(tmp_path)
    other = next(t for t in entries if t["type"] != task_type)
    with pytest.raises(ValueError, match=f"'{other['name']}' is a {other['type']} task"):
        head.model_class.from_pretrained(tmp_path, task=other["name"])


# ------------------------------------------------------------------------------------------------- pipelines
def _check_classification(results, task, size):
    assert {r["label"] for r in results} == set(task["labels"])
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)


def _check_segmentation(results, task, size):
    assert results and {r["label"] for r in results} <= set(task["labels"])
    for result in results:
        assert result["score"] is None
        assert result["mask"].mode == "L" and result["mask"].size == size
    # the masks of a semantic map cover every pixel exactly once
    coverage = sum(np.asarray(r["mask"], dtype=np.int64) // 255 for r in results)
    assert (coverage == 1).all()


def _check_detection(results, task, size):
    assert results and all(set(d) == {"score", "label", "box"} for d in results)
    assert {d["label"] for d in results} <= set(task["labels"])
    assert [d["score"] for d in results] == sorted((d["score"] for d in results), reverse=True)
    width, height = size
    for d in results:
        assert 0 <= d["box"]["xmin"] <= d["box"]["xmax"] <= width
        assert 0 <= d["box"]["ymin"] <= d["box"]["ymax"] <= height


def _check_depth(result, task, size):
    width, height = size
    assert isinstance(result["predicted_depth"], torch.Tensor)
    assert result["predicted_depth"].shape == (height, width)
    assert isinstance(result["depth"], Image.Image) and result["depth"].size == size


PIPELINE_CHECKS = {
    "image-classification": (_check_classification, {}),
    "semantic-segmentation": (_check_segmentation, {}),
    "object-detection": (_check_detection, {"threshold": 0.0}),
    "depth-estimation": (_check_depth, {}),
}


def test_stock_pipeline_on_a_saved_folder(head, task_type, tasks, tiny_config, tmp_path):
    """The pipeline of the head's pipeline tag loads the folder without asking to run code (see `no_prompt`) and
    answers at the size of the input image."""
    head.model_class(tiny_config([tasks[task_type]])).save_pretrained(tmp_path)
    ModSquadImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    runner = pipeline(head.pipeline_tag, model=str(tmp_path))
    assert isinstance(runner.model, head.model_class)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    check, options = PIPELINE_CHECKS[task_type]
    check(runner(image, **options), tasks[task_type], image.size)


# ---------------------------------------------------------------------------------- a head the checkpoint lacks
def test_head_missing_from_the_checkpoint_is_initialised(head, task_type, tasks, tiny_config, tmp_path):
    # A checkpoint of another head type has no weights of this head: _init_weights must cover every one of them
    # (anything it misses would stay uninitialised memory).
    donor_type = "semantic-segmentation" if task_type == "image-classification" else "image-classification"
    donor = tasks[donor_type]
    config = tiny_config([donor, tasks[task_type]])
    task_head_class(donor_type).model_class(config, task=donor["name"]).save_pretrained(tmp_path)
    model = head.model_class.from_pretrained(tmp_path, task=tasks[task_type]["name"])

    covered = set()
    for name, module in model.heads.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            if module.weight.numel() > 100:  # truncated normal, std = initializer_range
                assert 0.01 < module.weight.std() < 0.03, name
            assert module.bias is None or torch.equal(module.bias, torch.zeros_like(module.bias)), name
        elif isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
        else:
            continue
        covered.update(id(p) for p in module.parameters(recurse=False))
    assert covered == {id(p) for p in model.heads.parameters()}  # no weight of a kind the checks above miss
