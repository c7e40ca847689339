"""A time budget under two CPU processes (`accelerate launch`, gloo): the main process's clock decides, the decision
travels in the per-step all-reduce, and both processes stop at the same step with bit-identical replicas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO = {"demo": True, "num_train": 16, "num_val": 4, "image_size": 32, "seed": 0}
MODEL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "patch_size": 8,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "expert_intermediate_size": 32,
    "moe_layers": "all",
}


@pytest.mark.slow
def test_two_processes_stop_together_at_the_budget(tmp_path, launch_two_processes):
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"config": MODEL},
        "tasks": [{"name": "cls", "dataset": DEMO, "batch_size": 2, "image_size": 32}],
        "optimization": {"learning_rate": 1e-3},
        "training": {"max_steps": 50, "log_every": 10, "eval_at_end": False, "tracker": "none", "cpu": True},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    done = launch_two_processes(path, "--max-minutes", "1e-9")

    assert "training was cut short at the time budget: 1 of 50 steps" in done.stdout
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1]
    # Each process checks the other's parameters at the end: a process still training would hang or differ.
    digests = json.loads((run / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (run / "final" / "model.safetensors").is_file()
