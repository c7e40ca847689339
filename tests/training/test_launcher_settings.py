"""Accelerate's own configuration wins over the recipe's defaults: `accelerate launch --mixed_precision bf16` (or the
`accelerate config` file it reads) ends with bf16 unless the recipe sets a precision itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modsquad.training.recipe import load_recipe
from modsquad.training.trainer import build_accelerator

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[2]
TASKS = [{"name": "cls", "type": "image-classification"}]


def recipe(tmp_path: Path, **training):
    return load_recipe(
        tasks=TASKS, output_dir=str(tmp_path / "run"), training={"tracker": "none", **training}
    )


def test_the_launchers_precision_wins_when_the_recipe_sets_none(tmp_path, monkeypatch):
    # What `accelerate launch --mixed_precision bf16` (or an `accelerate config` answer) leaves for the script.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert build_accelerator(recipe(tmp_path)).mixed_precision == "bf16"


def test_a_precision_the_recipe_sets_wins_over_the_launcher(tmp_path, monkeypatch, fresh_accelerate_state):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert build_accelerator(recipe(tmp_path, mixed_precision="no")).mixed_precision == "no"


def test_without_a_launcher_the_precision_is_auto(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert build_accelerator(recipe(tmp_path, cpu=True)).mixed_precision == "no"  # "auto" on a CPU


def test_gradient_accumulation_follows_the_same_rule(tmp_path, monkeypatch, fresh_accelerate_state):
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    assert build_accelerator(recipe(tmp_path)).gradient_accumulation_steps == 3
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert build_accelerator(recipe(tmp_path, gradient_accumulation_steps=2)).gradient_accumulation_steps == 2


@pytest.mark.slow
def test_accelerate_launch_mixed_precision_bf16_trains_in_bf16(tmp_path):
    config = {
        "output_dir": str(tmp_path / "run"),
        "model": {"config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8,
                             "num_experts": 2, "num_experts_per_tok": 1, "expert_intermediate_size": 16}},
        "tasks": [{"name": "cls", "dataset": {"demo": True, "num_train": 8, "num_val": 2, "image_size": 32},
                   "batch_size": 4, "image_size": 32}],
        "training": {"max_steps": 2, "eval_at_end": False, "save_final_model": False, "tracker": "csv"},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(json.dumps(config))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", "bf16", "--dynamo_backend", "no",
        str(REPO / "training" / "train.py"), "--config", str(tmp_path / "recipe.yaml"),
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    hparams = json.loads((tmp_path / "run" / "logs" / "tracker" / "hparams.json").read_text())
    assert hparams["accelerate.mixed_precision"] == "bf16"
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["training"]["mixed_precision"] is None  # the recipe left it to the launcher
