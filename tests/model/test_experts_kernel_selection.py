"""The default experts implementation, `"auto"`, picks its kernel by device: the sorted per-expert GEMMs on CPU, one
grouped GEMM per projection (no Python loop over experts, no host sync) on accelerators. There is no GPU here: the
selection is checked by device type, the grouped kernel's maths on CPU (torch has a CPU `grouped_mm`), and its
freedom from host syncs on the meta device, where any read of a tensor's values raises."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from modsquad import ModSquadForImageClassification
from modsquad.model.modeling_modsquad import eager_attention_forward
from modsquad.model.moe import ModSquadAttentionExperts, ModSquadSparseMLP
from modsquad.model.sorted_mm import (
    AUTO,
    GROUPED_MM,
    SORTED_MM,
    ExpertDispatch,
    attention_experts_kernel,
    expert_linear,
    grouped_mm_linear,
    resolve_experts_implementation,
    sorted_grouped_mm_experts_forward,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


@pytest.mark.parametrize(
    ("device_type", "mlp_kernel", "attention_kernel"),
    [("cpu", SORTED_MM, SORTED_MM), ("cuda", GROUPED_MM, GROUPED_MM), ("xpu", GROUPED_MM, GROUPED_MM)],
)
def test_auto_picks_the_kernel_by_device(device_type, mlp_kernel, attention_kernel):
    assert resolve_experts_implementation(AUTO, device_type) == mlp_kernel
    assert attention_experts_kernel(AUTO, device_type) == attention_kernel


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_a_kernel_the_user_picks_is_kept_on_every_device(device_type):
    for name in (SORTED_MM, GROUPED_MM, "eager", "batched_mm"):
        assert resolve_experts_implementation(name, device_type) == name
    assert attention_experts_kernel(GROUPED_MM, device_type) == GROUPED_MM
    # Attention experts are no MLP: the MLP-only kernels run them with the sorted GEMMs.
    for name in (SORTED_MM, "eager", "batched_mm"):
        assert attention_experts_kernel(name, device_type) == SORTED_MM


def test_models_default_to_auto_and_a_pick_overrides_it(tiny_config, tmp_path):
    model = ModSquadForImageClassification(tiny_config())
    assert model.config._experts_implementation == AUTO
    model.save_pretrained(tmp_path)
    picked = ModSquadForImageClassification.from_pretrained(tmp_path, experts_implementation=SORTED_MM)
    assert picked.config._experts_implementation == SORTED_MM
    assert ModSquadForImageClassification.from_pretrained(tmp_path).config._experts_implementation == AUTO


def _spread_routers(model: torch.nn.Module, std: float = 0.5) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(0.0, std)


@pytest.mark.parametrize("moe_attention", [False, True])
def test_auto_on_an_accelerator_runs_forward_and_backward_without_reading_a_value(tiny_config, moe_attention):
    """The meta device stands in for a GPU: shapes propagate, values do not exist, so a host sync (`.tolist()`,
    `.item()`, data-dependent slicing) raises. bf16, as torch's grouped GEMM kernel takes."""
    model = ModSquadForImageClassification(tiny_config(moe_attention=moe_attention)).to(
        "meta", torch.bfloat16
    )
    pixel_values = torch.empty(2, 3, 32, 32, device="meta", dtype=torch.bfloat16)

    out = model(pixel_values, output_router_logits=True)
    (out.logits.float().sum() + out.aux_loss).backward()

    assert out.logits.shape == (2, 3) and out.logits.device.type == "meta"
    experts = model.modsquad.layers[1].mlp.experts
    assert experts.up_proj.grad is not None and experts.up_proj.grad.shape == experts.up_proj.shape
    # The sorted kernel, fastest on CPU, reads the expert row counts on the host: not what a GPU should run.
    model.set_experts_implementation(SORTED_MM)
    with pytest.raises(NotImplementedError, match="meta"):
        model(pixel_values)


def test_grouped_kernel_gives_eager_outputs_and_gradients(tiny_config):
    config = tiny_config(num_experts=5, num_experts_per_tok=2, expert_intermediate_size=48)
    mlp = ModSquadSparseMLP(config, 5)
    with torch.no_grad():
        for name, param in mlp.named_parameters():
            param.normal_(0.0, 0.1 if "bias" in name else 1.0 / math.sqrt(param.shape[-1]))
    hidden = torch.randn(3, 23, 64)
    grad_out = torch.randn_like(hidden)

    def run(kernel) -> dict[str, torch.Tensor]:
        mlp.zero_grad(set_to_none=True)
        tokens = hidden.reshape(-1, 64).clone().requires_grad_(True)
        routing = mlp.router(tokens, 0)
        out = kernel(tokens, routing)
        out.backward(grad_out.reshape(-1, 64))
        grads = {f"{name}.grad": param.grad for name, param in mlp.named_parameters()}
        return {"output": out.detach(), "tokens.grad": tokens.grad, **grads}

    config._experts_implementation = "eager"
    expected = run(lambda tokens, r: mlp.experts(tokens, r.top_k_index, r.top_k_weights))
    actual = run(
        lambda tokens, r: sorted_grouped_mm_experts_forward(
            mlp.experts, tokens, r.top_k_index, r.top_k_weights
        )
    )
    assert expected["router.weight.grad"].abs().max() > 1e-3
    for name in expected:
        assert_close(actual[name], expected[name], **TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")


def test_attention_experts_give_the_same_result_with_either_kernel(tiny_config):
    config = tiny_config(moe_attention=True, num_experts=4, num_experts_per_tok=2)
    module = ModSquadAttentionExperts(config, 4, eager_attention_forward)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.normal_(0.0, 0.1 if "bias" in name else 1.0 / math.sqrt(64))
    hidden = torch.randn(2, 7, 64)
    results = {}
    for kernel in (SORTED_MM, GROUPED_MM):
        config._experts_implementation = kernel
        module.zero_grad(set_to_none=True)
        out, _ = module(hidden, 0)
        out.square().sum().backward()
        results[kernel] = (
            out.detach(),
            module.q_proj.grad,
            module.o_proj_bias.grad,
            module.router.weight.grad,
        )
    for sorted_value, grouped_value in zip(results[SORTED_MM], results[GROUPED_MM]):
        assert_close(grouped_value, sorted_value, **TOLERANCE)


def test_expert_linear_kernels_agree_and_unknown_ones_are_rejected():
    dispatch = ExpertDispatch.from_indices(torch.tensor([[0, 2], [2, 1], [0, 2]]), num_experts=4)
    rows = torch.randn(dispatch.num_rows, 8)
    weight, bias = torch.randn(4, 5, 8), torch.randn(4, 5)
    sorted_out = expert_linear(rows, weight, bias, dispatch, SORTED_MM)
    expected = torch.stack(
        [weight[e] @ row + bias[e] for e, row in zip(dispatch.expert_of_row.tolist(), rows)]
    )
    assert_close(sorted_out, expected, **TOLERANCE)
    assert_close(expert_linear(rows, weight, bias, dispatch, GROUPED_MM), expected, **TOLERANCE)
    with pytest.raises(ValueError, match="kernel='eager'; accepted"):
        expert_linear(rows, weight, bias, dispatch, "eager")


def test_grouped_kernel_computes_in_the_autocast_dtype():
    """Under autocast, as `F.linear`, the grouped GEMM runs in the autocast dtype (bf16: the one dtype torch's GPU
    grouped kernel takes) rather than casting the rows up to the fp32 master weights."""
    dispatch = ExpertDispatch.from_indices(torch.tensor([[0, 1], [1, 0]]), num_experts=2)
    rows, weight, bias = torch.randn(4, 16), torch.randn(2, 16, 16), torch.randn(2, 16)
    assert grouped_mm_linear(rows, weight, bias, dispatch).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = grouped_mm_linear(rows, weight, bias, dispatch)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), grouped_mm_linear(rows, weight, bias, dispatch), atol=0.5, rtol=0.05)
