"""`modsquad benchmark memory` (allocator peaks, one graph vs one task at a time) and `modsquad benchmark samplers`
(the demo under each mixing strategy, per-step vs streaming MI)."""

from __future__ import annotations

import json

import pytest
import torch

from modsquad.cli import main
from modsquad.commands.benchmark import MEMORY_CASES, measure_memory, sampler_recipe
from modsquad.training.memory import allocator_peak

pytestmark = pytest.mark.usefixtures("one_thread")


def test_allocator_peak_counts_the_tensors_alive_at_the_worst_moment():
    kept = []

    def region():
        kept.append(torch.empty(2**20, dtype=torch.uint8))  # 1 MiB that stays
        temporary = torch.empty(2 * 2**20, dtype=torch.uint8)  # 2 MiB freed before the region ends
        del temporary
        torch.empty(2**19, dtype=torch.uint8)  # then 0.5 MiB, freed at once: not a new peak

    peak = allocator_peak(region)
    assert peak.peak_bytes == 3 * 2**20
    assert peak.end_bytes == 2**20
    assert peak.allocations == 3


def test_sampler_runs_see_as_many_images_as_the_simt_run(tmp_path):
    simt = sampler_recipe("simt", "step", tmp_path / "a", steps=100)
    uniform = sampler_recipe("uniform", "streaming", tmp_path / "b", steps=100, tasks_per_step=2)
    assert (simt.training.max_steps, uniform.training.max_steps) == (100, 200)  # 4 vs 2 micro-batches a step
    assert {t.batch_size for t in simt.tasks} == {16}  # equal micro-batches: equal images
    assert [t.dataset["num_train"] for t in uniform.tasks] == [1024, 256, 128, 64]
    assert (uniform.mixing.strategy, uniform.mixing.tasks_per_step) == ("uniform", 2)
    assert (simt.optimization.mi_estimator, uniform.optimization.mi_estimator) == ("step", "streaming")


@pytest.mark.slow
def test_memory_benchmark_one_task_at_a_time_needs_less_than_one_graph(fresh_accelerate_state):
    result = measure_memory(MEMORY_CASES["tiny"], per_task=False)
    single, one_at_a_time = result["rows"]
    assert single["mode"] == "one graph, all tasks" and one_at_a_time["mode"] == "one task at a time"
    assert result["ratio"] == one_at_a_time["peak_bytes"] / single["peak_bytes"] < 0.9
    # both steps leave exactly the parameter gradients behind
    assert single["end_bytes"] == one_at_a_time["end_bytes"] == result["gradients_bytes"]


@pytest.mark.slow
def test_samplers_benchmark_prints_metrics_and_mutual_information_per_router(tmp_path, capsys):
    json_path = tmp_path / "samplers.json"
    arguments = ["benchmark", "samplers", "--output-dir", str(tmp_path / "runs"), "--steps", "2", "--sizes"]
    arguments += ["32", "32", "16", "16", "--num-val", "4", "--strategies", "simt", "proportional"]
    arguments += ["--json", str(json_path)]
    assert main(arguments) == 0
    table = capsys.readouterr().out
    assert "I layer1_mlp" in table and "proportional" in table and "streaming" in table
    runs = json.loads(json_path.read_text())["samplers"]
    assert [(r["strategy"], r["estimator"]) for r in runs] == [
        ("simt", "step"),
        ("simt", "streaming"),
        ("proportional", "step"),
        ("proportional", "streaming"),
    ]
    for run in runs:
        assert len(run["mutual_information"]) == 3 and all(
            0 <= mi <= 1.39 for mi in run["mutual_information"]
        )
        assert set(run["metrics"]) == {"cls", "det", "seg", "depth"}
    # a finished run is read back, not trained again
    assert (tmp_path / "runs" / "simt-step" / "sampler_result.json").is_file()
