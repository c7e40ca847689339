"""A time budget under two CPU processes (`accelerate launch`, gloo): the main process's clock decides, the decision
travels in the per-step all-reduce, and both processes stop at the same step with bit-identical replicas."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_stop_together_at_the_budget(tmp_path):
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"config": MODEL},
        "tasks": [{"name": "cls", "dataset": DEMO, "batch_size": 2, "image_size": 32}],
        "optimization": {"learning_rate": 1e-3},
        "training": {"max_steps": 50, "log_every": 10, "eval_at_end": False, "tracker": "none", "cpu": True},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), str(REPO / "training" / "train.py"), "--config", str(path),
        "--max-minutes", "1e-9",
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    assert "training was cut short at the time budget: 1 of 50 steps" in done.stdout
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1]
    # Each process checks the other's parameters at the end: a process still training would hang or differ.
    digests = json.loads((run / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
    assert (run / "final" / "model.safetensors").is_file()
