"""`modsquad benchmark model`: a ModSquad backbone, and the same pruned, against a Transformers ViTModel of the same
active size, interleaved, forward and training step, in images per second (timed here on a tiny case only)."""

from __future__ import annotations

import json

import pytest
import torch

from modsquad.cli import main
from modsquad.commands.benchmark import (
    MODEL_CASES,
    ModelCase,
    build_models,
    format_model_table,
    measure_model_case,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ModelCase(
    "tiny", batch=2, image_size=32, patch_size=8, hidden=32, layers=4, heads=2, num_experts=8,
    expert_intermediate_size=16, top_k=2,
)  # fmt: skip


def test_the_default_case_is_vit_s16_with_moe_every_other_block():
    case = MODEL_CASES["s16"]
    assert (case.layers, case.hidden, case.heads, case.patch_size, case.image_size) == (12, 384, 6, 16, 224)
    assert (case.num_experts, case.expert_intermediate_size, case.top_k) == (16, 384, 4)
    assert (
        case.dense_intermediate_size == 1536
    )  # ViT-S's MLP: the same FLOPs per token as top-4 experts of 384


def test_models_have_the_same_active_size_and_the_pruned_one_fewer_experts():
    models = build_models(TINY)
    vit, modsquad, pruned = models["vit"], models["modsquad"], models["modsquad-pruned"]
    assert vit.config.intermediate_size == TINY.top_k * TINY.expert_intermediate_size
    assert modsquad.config.num_experts_per_tok * modsquad.config.expert_intermediate_size == 32
    assert len(modsquad.layers) == len(vit.layers) == TINY.layers
    assert modsquad.config.experts_per_layer == [8, 8]
    kept = pruned.config.experts_per_layer
    assert all(TINY.top_k <= n < 8 for n in kept)  # the experts used above the uniform share
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in modsquad.parameters())
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert modsquad(pixel_values).last_hidden_state.shape == (2, 16 + 2, 32)  # [CLS], task token, patches
        assert vit(pixel_values).last_hidden_state.shape == (2, 16 + 1, 32)


def test_every_row_is_timed_against_dense_in_both_modes():
    measurements, facts = measure_model_case(TINY, ["auto", "sorted_mm"], repeats=2, warmup=1)

    rows = {(m.model, m.implementation, m.mode): m for m in measurements}
    expected = {("vit", None), ("modsquad", "auto"), ("modsquad", "sorted_mm"), ("modsquad-pruned", "auto")}
    assert set(rows) == {(*row, mode) for row in expected for mode in ("fwd", "fwd+bwd", "train")}
    for m in measurements:
        assert m.ms > 0 and m.images_per_second == pytest.approx(TINY.batch / m.ms * 1e3)
        assert m.ratio == pytest.approx(m.ms / m.dense_ms) and m.best_ratio > 0
    assert rows[("vit", None, "train")].ratio == 1.0
    assert facts["tokens"] == {"vit": 17, "modsquad": 18}
    table = format_model_table(TINY, measurements, facts)
    assert "modsquad-pruned" in table and "img/s" in table and "experts per MoE block" in table


def test_a_training_step_updates_every_model():
    models = build_models(TINY)
    before = {name: [p.detach().clone() for p in model.parameters()] for name, model in models.items()}
    measure_model_case(TINY, ["auto"], repeats=1, warmup=0, models=models)
    for name, model in models.items():
        changed = [not torch.equal(a, b) for a, b in zip(before[name], model.parameters())]
        assert sum(changed) > len(changed) // 2, name


def test_the_command_rejects_cases_of_the_other_benchmark(capsys):
    # A user error is one line on stderr and exit status 2.
    assert main(["benchmark", "model", "--cases", "a"]) == 2
    assert "cases ['a'] are not `benchmark model` cases; accepted: ['s16']" in capsys.readouterr().err
    assert main(["benchmark", "model", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_the_command_prints_the_vit_s16_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "model.json"
    code = main(
        ["benchmark", "model", "--repeats", "1", "--warmup", "0", "--batch-size", "1", "--threads", "1",
         "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "case s16: batch 1 at 224 px" in printed and "modsquad-pruned" in printed
    report = json.loads(out.read_text())
    assert report["what"] == "model" and len(report["cases"][0]["measurements"]) == 9
