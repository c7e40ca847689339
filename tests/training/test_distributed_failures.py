"""Two CPU processes: bad data in one process's shard stops both processes at once, each with one line, instead of
leaving the other waiting in a collective until the process group times out."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def _png(rng: np.random.Generator) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


@pytest.mark.slow
def test_a_bad_row_in_one_shard_stops_both_processes(tmp_path, launch_two_processes):
    rng = np.random.default_rng(0)
    # Every row is corrupt on purpose except a few: whichever rows each process draws, one of them fails first.
    images = [_png(rng) if i % 4 else {"bytes": b"broken", "path": None} for i in range(16)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    rows = datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(16)]}, features)
    datasets.DatasetDict({"train": rows}).save_to_disk(str(tmp_path / "data"))
    recipe = {
        "output_dir": str(tmp_path / "run"),
        "model": {"config": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 8,
                             "num_experts": 2, "num_experts_per_tok": 1, "expert_intermediate_size": 16}},
        "tasks": [{"name": "cls", "type": "image-classification", "dataset": {"path": str(tmp_path / "data")},
                   "eval_split": None, "batch_size": 2, "image_size": 32}],
        "training": {"max_steps": 3, "tracker": "none", "cpu": True, "eval_at_end": False, "max_bad_rows": 0},
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    done = launch_two_processes(tmp_path / "recipe.yaml", expect_success=False, timeout=300)
    assert done.returncode != 0  # and it returned: no process was left waiting in a collective
    errors = [
        line.split("train.py: error: ", 1)[1]
        for line in done.stderr.splitlines()
        if "train.py: error: " in line
    ]
    assert any("cannot be read: UnidentifiedImageError" in line for line in errors), done.stderr[-4000:]
    # The other process stops too, naming the one whose data failed (unless the launcher already ended it).
    assert all("cannot be read" in line or "stopping too" in line for line in errors), errors
