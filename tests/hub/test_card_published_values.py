"""What a model card publishes: only defined summary metrics in `model-index` (no COCO -1, no per-class entries), the
relation to a dense base model, and an inference-widget example of the task's own data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from huggingface_hub import ModelCard
from PIL import Image

from modsquad.hub.model_card import EXAMPLE_IMAGE, render_run_cards
from modsquad.pruning.run import prune_run
from modsquad.run_folder import RunFolder

REPO = "org/modsquad-tiny"
# What evaluate_model returns for these tasks on a small split: per-class entries, a NaN, COCO's -1 for sizes
# absent from the split.
RAW_METRICS = {
    "cls": {"accuracy": 0.75},
    "seg": {
        "mean_iou": 0.5, "mean_accuracy": 0.6, "overall_accuracy": 0.9, "iou_background": 0.8, "iou_shape": 0.2,
        "accuracy_background": 0.9, "accuracy_shape": 0.3,
    },
    "det": {
        "map": 0.4, "map_50": 0.7, "map_75": 0.3, "map_small": 0.4, "map_medium": -1.0, "map_large": -1.0,
        "mar_1": 0.3, "mar_10": 0.5, "mar_100": 0.5, "mar_small": 0.5, "mar_medium": -1.0, "mar_large": float("nan"),
    },
}  # fmt: skip
PUBLISHED = {
    "cls": {"accuracy"},
    "seg": {"mean_iou", "mean_accuracy", "overall_accuracy"},
    "det": {"map", "map_50", "map_75", "map_small", "mar_1", "mar_10", "mar_100", "mar_small"},
}


def _model_index(card: ModelCard) -> dict[str, dict[str, float]]:
    metadata = yaml.safe_load(str(card).split("---")[1])
    published: dict[str, dict[str, float]] = {}
    for result in metadata["model-index"][0]["results"]:
        task = result["task"]["name"]
        published.setdefault(task, {}).update({m["type"]: m["value"] for m in result["metrics"]})
    return published


def test_model_index_holds_only_defined_summary_metrics(
    tmp_path, small_tasks, validate_card, make_run_folder
):
    make_run_folder(tmp_path, [small_tasks["cls"], small_tasks["seg"], small_tasks["det"]])
    (tmp_path / "metrics.json").write_text(json.dumps(RAW_METRICS))
    card = render_run_cards(RunFolder.open(tmp_path), repo_id=REPO)[tmp_path / "model"]
    published = _model_index(card)
    assert {task: set(values) for task, values in published.items()} == PUBLISHED
    assert all(value != -1.0 for values in published.values() for value in values.values())
    assert card.data.metrics == sorted(set().union(*PUBLISHED.values()))
    assert "iou_background" not in card.text and "-1.0000" not in card.text  # the Evaluation table alike
    assert validate_card(str(card)) == []


@pytest.mark.slow
def test_upcycled_model_declares_finetune_and_pruned_models_only_their_parent(
    tmp_path, small_tasks, validate_card, make_run_folder, pixel_loader
):
    make_run_folder(tmp_path, [small_tasks["cls"], small_tasks["seg"]])
    prune_run(tmp_path, {"cls": pixel_loader(1, batches=1), "seg": pixel_loader(2, batches=1)})
    cards = render_run_cards(RunFolder.open(tmp_path), repo_id=REPO, base_model="facebook/dinov2-small")
    parent = cards[tmp_path / "model"].data
    assert (parent.base_model, parent.base_model_relation) == ("facebook/dinov2-small", "finetune")
    # adapter, merge, quantized, finetune: none describes a pruned sub-model, so none is claimed.
    child = cards[tmp_path / "tasks" / "seg"].data
    assert child.base_model == REPO and getattr(child, "base_model_relation", None) is None
    assert all(validate_card(str(card)) == [] for card in cards.values())


@pytest.mark.slow
def test_cards_show_an_example_of_the_tasks_own_data_in_the_widget(
    tmp_path, small_tasks, validate_card, make_run_folder, pixel_loader
):
    make_run_folder(tmp_path, [small_tasks["cls"], small_tasks["seg"]])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(3)]
    features = Features({"picture": ImageFeature(), "label": ClassLabel(names=small_tasks["cls"]["labels"])})
    validation = Dataset.from_dict({"picture": images, "label": [0, 1, 2]}, features=features)
    prune_run(
        tmp_path,
        {"cls": pixel_loader(1, batches=1)},
        validation_datasets={"cls": validation},
        evaluation_options={"cls": {"columns": {"image": "picture"}, "batch_size": 3}},
    )
    for folder in (tmp_path / "tasks" / "cls", tmp_path / "model"):  # cls is the parent's first task too
        with Image.open(folder / EXAMPLE_IMAGE) as example:
            assert example.size == (40, 40)
    cards = render_run_cards(RunFolder.open(tmp_path), repo_id=REPO)
    child = cards[tmp_path / "tasks" / "cls"].data
    assert child.widget == [
        {
            "src": f"https://huggingface.co/{REPO}-cls/resolve/main/{EXAMPLE_IMAGE}",
            "example_title": "cls example",
        }
    ]
    assert (
        cards[tmp_path / "model"].data.widget[0]["src"].startswith(f"https://huggingface.co/{REPO}/resolve/")
    )
    assert all(validate_card(str(card)) == [] for card in cards.values())
    # Without a Hub address (a local folder) there is nothing for a widget to load.
    local = render_run_cards(RunFolder.open(tmp_path))[tmp_path / "tasks" / "cls"].data
    assert getattr(local, "widget", None) is None
