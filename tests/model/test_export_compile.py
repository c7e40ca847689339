"""`torch.export` and `torch.compile` of ModSquad models with the default experts kernel: exported programs match eager
for any routing (the expert row counts are data, never baked into the graph), and dynamo sees the whole model as one
graph, MoE layers (MLP and attention experts) included."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from modsquad import ModSquadForImageClassification
from modsquad.model.moe import ModSquadTaskRouter

pytestmark = pytest.mark.usefixtures("one_thread")

VARIANTS = {"mlp_experts": {}, "attention_experts": {"moe_attention": True}}


def _model(tiny_config, **overrides) -> ModSquadForImageClassification:
    """A tiny classifier whose routers spread tokens over experts (zero routers send every token to the same ones),
    returning its routing (`output_router_logits`) so that the tests can compare it."""
    model = ModSquadForImageClassification(tiny_config(output_router_logits=True, **overrides))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ModSquadTaskRouter):
                module.weight.normal_(0.0, 0.5)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_classifier_matches_eager_for_new_routings(tiny_config, variant):
    model = _model(tiny_config, **VARIANTS[variant])
    assert model.config._experts_implementation == "auto"
    example = torch.randn(2, 3, 32, 32)

    program = torch.export.export(model, (example,))

    # The per-expert GEMMs are one opaque operator whose row counts are an input tensor, not graph constants.
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "modsquad.sorted_grouped_linear.default" in targets
    exported = program.module()
    for pixel_values in (example, torch.randn(2, 3, 32, 32) * 3.0):
        with torch.no_grad():
            expected = model(pixel_values)
            actual = exported(pixel_values)
        assert_close(actual.logits, expected.logits, atol=1e-5, rtol=1e-4)
        for got, wanted in zip(actual.expert_indices, expected.expert_indices):
            assert torch.equal(got, wanted)
    # The second input routes differently from the example: the program was not specialised on its routing.
    assert any(
        not torch.equal(a, b)
        for a, b in zip(model(example).expert_indices, model(torch.randn(2, 3, 32, 32) * 3.0).expert_indices)
    )


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dynamo_traces_the_whole_model_as_one_graph(tiny_config, variant):
    model = _model(tiny_config, **VARIANTS[variant]).train()
    pixel_values = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(pixel_values)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_training_step_gives_eager_gradients(tiny_config, variant):
    model = _model(tiny_config, **VARIANTS[variant]).train()
    pixel_values = torch.randn(2, 3, 32, 32)

    def gradients(forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = forward(pixel_values)
        (out.logits.square().sum() + out.aux_loss).backward()
        return out.logits.detach(), {
            name: p.grad for name, p in model.named_parameters() if p.grad is not None
        }

    torch._dynamo.reset()
    expected_logits, expected = gradients(model)
    # aot_eager traces forward and backward exactly as inductor would see them, without compiling C++.
    actual_logits, actual = gradients(torch.compile(model, backend="aot_eager", fullgraph=True))
    assert_close(actual_logits, expected_logits, atol=1e-5, rtol=1e-4)
    assert set(actual) == set(expected) and any("experts" in name for name in actual)
    for name in expected:
        assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_the_gpu_kernel_traces_without_a_graph_break(tiny_config):
    """`auto`'s kernel for accelerators, traced here on CPU (its grouped GEMM goes through Transformers' grouped_mm
    dispatcher, which is one opaque operator under dynamo)."""
    from modsquad.model.moe import ModSquadSparseMLP
    from modsquad.model.sorted_mm import sorted_grouped_mm_experts_forward

    mlp = ModSquadSparseMLP(tiny_config(), 4)
    with torch.no_grad():
        for param in mlp.parameters():
            param.normal_(0.0, 0.1)
    tokens = torch.randn(18, 64)

    def layer(tokens: torch.Tensor) -> torch.Tensor:
        routing = mlp.router(tokens, 0)
        return sorted_grouped_mm_experts_forward(
            mlp.experts, tokens, routing.top_k_index, routing.top_k_weights
        )

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(tokens)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert_close(
        torch.compile(layer, backend="aot_eager", fullgraph=True)(tokens), layer(tokens), atol=1e-5, rtol=1e-4
    )
