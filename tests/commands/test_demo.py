"""`modsquad demo` with a tiny budget writes every file of its run folder; the demo recipe file matches the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modsquad.cli import main
from modsquad.commands.demo import DEMO_RECIPE
from modsquad.training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_writes_the_whole_run_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--output-dir", str(out), "--max-steps", "3", "--num-train", "8", "--num-val", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    for task in ("cls", "det", "seg", "depth"):
        assert task in printed

    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["metrics"]) == {"cls", "det", "seg", "depth"}
    assert set(summary["baselines"]) == {"cls", "det", "seg", "depth"}
    assert summary["headline"]["cls"]["accuracy"] is not None and summary["steps"] == 3
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (out / "final" / name).is_file()
    heatmaps = sorted(p.name for p in (out / "expert_usage").glob("*.png"))
    assert heatmaps == ["layer1_mlp.png", "layer3_mlp.png", "layer5_mlp.png"]
    usage = json.loads((out / "expert_usage" / "fractions.json").read_text())
    assert all(sum(row) == pytest.approx(1.0) for table in usage.values() for row in table)
    assert len((out / "training_log.jsonl").read_text().splitlines()) >= 1
    assert (out / "logs" / "tracker" / "metrics.csv").is_file()
    assert load_recipe(out / "recipe.yaml").training.max_steps == 3

    # Every task pruned into a standalone model with its card, checked against the full model.
    pruning = {row["task"]: row for row in summary["pruning"]}
    assert set(pruning) == {"cls", "det", "seg", "depth"}
    for task, row in pruning.items():
        folder = out / "tasks" / task
        for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
            assert (folder / name).is_file(), (task, name)
        assert row["params_after"] <= row["params_before"]
        assert row["max_abs_diff"] is not None and row["metric_before"] is not None
    assert "experts kept" in printed  # the pruning table (the one `modsquad prune` prints too)
    assert {row["task"] for row in json.loads((out / "pruning.json").read_text())} == set(pruning)


def test_demo_yaml_is_the_demo_recipe():
    from_file = load_recipe(REPO / "training" / "configs" / "demo.yaml")
    assert from_file == load_recipe(**DEMO_RECIPE)
