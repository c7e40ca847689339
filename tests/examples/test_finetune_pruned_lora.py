"""The example scripts run: LoRA fine-tuning of a pruned task model on a new dataset with new labels."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from modsquad import ModSquadForMultiTask, ModSquadImageProcessor, collect_expert_usage, prune_for_task

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _new_dataset(folder: Path) -> None:
    """Bright or dark images: a new task with labels the pruned model has never seen."""
    rng = np.random.default_rng(0)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["dark", "bright"])})
    splits = {}
    for split, rows in (("train", 16), ("validation", 8)):
        labels = [i % 2 for i in range(rows)]
        images = [
            Image.fromarray(rng.integers(0, 100, (40, 40, 3), dtype=np.uint8) + 150 * label)
            for label in labels
        ]
        splits[split] = Dataset.from_dict({"image": images, "label": labels}, features=features)
    DatasetDict(splits).save_to_disk(folder)


def test_finetune_pruned_lora_trains_an_adapter_for_new_labels(tmp_path, all_tasks, tiny_config):
    import torch

    model = ModSquadForMultiTask(tiny_config(tasks=all_tasks)).eval()
    calibration = [torch.randn(4, 3, 32, 32)]
    pruned = prune_for_task(model, "cls", collect_expert_usage(model, calibration, task="cls"))
    pruned.save_pretrained(tmp_path / "cls")
    ModSquadImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "cls")
    _new_dataset(tmp_path / "new-data")

    example = _load_example("finetune_pruned_lora")
    args = [str(tmp_path / "cls"), str(tmp_path / "new-data"), "--steps", "4", "--batch-size", "8"]
    report = example.main([*args, "--output-dir", str(tmp_path / "adapter")])
    assert 0 < report["trainable_percent"] < 100 and report["steps"] == 4
    assert 0.0 <= report["accuracy_after"] <= 1.0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
