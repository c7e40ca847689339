"""A checkpoint saved by the flat layout of commit 7610921 (tests/fixtures/layout_v0_multitask, see its
make_fixture.py) still loads, completely and with equal outputs, into today's multi-task and single-task models."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from modsquad import ModSquadForMultiTask, ModSquadForSemanticSegmentation

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "layout_v0_multitask"
OUTPUT_KEYS = ("logits", "pred_boxes", "predicted_depth")


def test_the_old_multi_task_checkpoint_loads_with_equal_outputs():
    model, info = ModSquadForMultiTask.from_pretrained(FIXTURE, output_loading_info=True)
    # Its dense heads' own LayerNorms of the last block are superseded by the backbone's final LayerNorm: ignored,
    # as nothing else may be.
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }
    expected = load_file(FIXTURE / "expected_outputs.safetensors")
    model.eval()
    with torch.no_grad():
        for task in ("cls", "seg", "det", "depth"):
            output = model(expected["pixel_values"], task=task)
            for key in OUTPUT_KEYS:
                if f"{task}.{key}" in expected:
                    torch.testing.assert_close(
                        getattr(output, key), expected[f"{task}.{key}"], atol=1e-6, rtol=0
                    )


def test_a_head_of_the_old_checkpoint_loads_alone():
    model, info = ModSquadForSemanticSegmentation.from_pretrained(FIXTURE, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    expected = load_file(FIXTURE / "expected_outputs.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(expected["pixel_values"]).logits, expected["seg.logits"])


def test_misnamed_head_weights_are_reported_not_ignored(tmp_path):
    model = ModSquadForMultiTask.from_pretrained(FIXTURE)
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
