"""Two CPU processes (gloo) training dense tasks only: every backbone parameter, the final LayerNorm included, gets a
gradient, so DDP raises no unused-parameter error and the replicas stay identical."""

from __future__ import annotations

import json

import pytest
from test_distributed import DEMO, recipe_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_dense_tasks_only_train_on_two_processes(tmp_path, launch_two_processes):
    tasks = [
        {"name": "seg", "dataset": DEMO, "batch_size": 2, "image_size": 32, "head": {"decoder_channels": 8}},
        {
            "name": "depth",
            "dataset": DEMO,
            "batch_size": 2,
            "image_size": 32,
            "head": {"decoder_channels": 8},
        },
    ]
    launch_two_processes(recipe_file(tmp_path, tasks))
    run = tmp_path / "run"
    log = [json.loads(line) for line in (run / "training_log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log] == [1, 2, 3]
    digests = json.loads((run / "replica_digests.json").read_text())
    assert len(digests) == 2 and digests[0] == digests[1]
