"""Checkpoints saved by older versions of the package still load, with the outputs they had."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from modsquad import ModSquadForMultiTask, ModSquadForSemanticSegmentation, ModSquadImageProcessor

# Saved at commit 7610921 by the flat layout (see make_fixture.py beside it): every head type, attention experts, and
# the detection neck's LayerNorms under their old names (`...upsample.0.1.norm.weight`).
FLAT_LAYOUT = Path(__file__).resolve().parents[1] / "fixtures" / "layout_v0_multitask"
OUTPUT_FIELDS = {
    "cls": ["logits"],
    "seg": ["logits"],
    "det": ["logits", "pred_boxes"],
    "depth": ["predicted_depth"],
}


def test_the_fixture_holds_the_old_weight_names():
    with safe_open(str(FLAT_LAYOUT / "model.safetensors"), framework="pt") as handle:
        assert "heads.det.neck.upsample.0.1.norm.weight" in set(handle.keys())


def test_a_flat_layout_checkpoint_loads_with_equal_outputs():
    model = ModSquadForMultiTask.from_pretrained(FLAT_LAYOUT).eval()
    expected = load_file(str(FLAT_LAYOUT / "expected_outputs.safetensors"))
    with torch.no_grad():
        for task, fields in OUTPUT_FIELDS.items():
            output = model(expected["pixel_values"], task=task)
            for field in fields:
                assert torch.equal(getattr(output, field), expected[f"{task}.{field}"]), (task, field)


def test_one_head_loads_out_of_it_through_its_auto_class():
    detector = AutoModelForObjectDetection.from_pretrained(FLAT_LAYOUT, task="det").eval()
    expected = load_file(str(FLAT_LAYOUT / "expected_outputs.safetensors"))
    with torch.no_grad():
        output = detector(expected["pixel_values"])
    assert torch.equal(output.pred_boxes, expected["det.pred_boxes"])
    assert isinstance(AutoImageProcessor.from_pretrained(FLAT_LAYOUT), ModSquadImageProcessor)


def test_resaving_writes_todays_weight_names(tmp_path):
    ModSquadForMultiTask.from_pretrained(FLAT_LAYOUT).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert "heads.det.neck.upsample.0.1.weight" in keys
    assert not any(".norm.weight" in key and "upsample" in key for key in keys)
    reloaded = ModSquadForMultiTask.from_pretrained(tmp_path).eval()
    expected = load_file(str(FLAT_LAYOUT / "expected_outputs.safetensors"))
    with torch.no_grad():
        output = reloaded(expected["pixel_values"], task="det")
    assert torch.equal(output.logits, expected["det.logits"])


def test_nothing_of_it_is_missing_or_unexpected():
    # Its dense heads' own LayerNorms of the last block are superseded by the backbone's final LayerNorm: ignored by
    # name, as nothing else may be.
    for model_class in (ModSquadForMultiTask, ModSquadForSemanticSegmentation):
        _, info = model_class.from_pretrained(FLAT_LAYOUT, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_misnamed_head_weights_are_reported_not_ignored(tmp_path):
    model = ModSquadForMultiTask.from_pretrained(FLAT_LAYOUT)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["heads.seg.classifer.weight"] = weights.pop(
        "heads.seg.classifier.weight"
    )  # a typo in a head's weight
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    for model_class in (ModSquadForMultiTask, ModSquadForSemanticSegmentation):
        _, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
        assert info["unexpected_keys"] == {"heads.seg.classifer.weight"}, model_class.__name__
        assert info["missing_keys"] == {"heads.seg.classifier.weight"}, model_class.__name__


@pytest.mark.parametrize(
    ("model_class", "task", "shipped", "not_shipped"),
    [
        ("ModSquadForImageClassification", "cls", {"head_classification.py"}, {"head_detection.py"}),
        ("ModSquadForObjectDetection", "det", {"head_detection.py", "loss_detection.py"}, {"head_depth.py"}),
    ],
)
def test_a_saved_head_ships_only_the_code_its_class_needs(tmp_path, model_class, task, shipped, not_shipped):
    import modsquad

    getattr(modsquad, model_class).from_pretrained(FLAT_LAYOUT, task=task).save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.glob("*.py")}
    assert shipped | {"configuration_modsquad.py", "modeling_modsquad.py", "moe.py", "sorted_mm.py"} <= files
    assert not files & (not_shipped | {"upcycling.py", "modeling_multitask.py"})
