"""Every experts kernel that runs on CPU gives eager's outputs and gradients (with even, uneven and empty routing,
top-1 and top-all), checkpoints switch kernels freely, the attention experts compute what their definition says,
and the MoE benchmark times every kernel against dense."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

import modsquad.model.moe as moe
from modsquad import SORTED_MM, ModSquadConfig, ModSquadForImageClassification
from modsquad.cli import main
from modsquad.commands.benchmark import MoECase, format_table, measure_case
from modsquad.model.modeling_modsquad import eager_attention_forward
from modsquad.model.moe import ModSquadAttentionExperts, ModSquadExperts, ModSquadSparseMLP
from modsquad.model.sorted_mm import AUTO, ExpertDispatch

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = 64
TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


def _runs_on_cpu(name: str) -> bool:
    """Whether an experts implementation accepts fp32 GELU experts on CPU (deepgemm and sonicmoe refuse). Runs at
    collection (it picks the parametrisation), so with a config of its own rather than the `tiny_config` fixture."""
    config = ModSquadConfig(
        tasks=[{"name": "cls", "type": "image-classification", "num_labels": 3}],
        hidden_size=HIDDEN,
        num_attention_heads=4,
        num_experts=2,
        num_experts_per_tok=1,
        expert_intermediate_size=32,
    )
    config._experts_implementation = name
    experts = ModSquadExperts(config, 2)
    for param in experts.parameters():
        torch.nn.init.normal_(param)
    try:
        experts(torch.randn(3, HIDDEN), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))
    except (ValueError, RuntimeError, ImportError, NotImplementedError):
        return False
    return True


CPU_IMPLEMENTATIONS = [name for name in ["eager", *ALL_EXPERTS_FUNCTIONS.keys()] if _runs_on_cpu(name)]
KERNELS = CPU_IMPLEMENTATIONS


def test_the_kernels_users_can_pick_on_cpu_are_all_checked():
    assert {"eager", AUTO, SORTED_MM, "grouped_mm", "batched_mm"} <= set(CPU_IMPLEMENTATIONS)


# ------------------------------------------------------------------------------------------- MLP experts
# name -> (num_experts, top_k, norm_topk_prob, routing); top-1 without renormalisation keeps a router gradient.
ROUTINGS = {
    "balanced": (4, 2, True, "spread"),
    "uneven_with_an_empty_expert": (5, 2, True, "skewed"),
    "top_1": (4, 1, False, "spread"),
    "top_all": (4, 4, True, "spread"),
}


def _sparse_mlp(tiny_config, num_experts: int, top_k: int, norm_topk_prob: bool, routing: str):
    """A randomly initialised MoE MLP and tokens for it. `skewed`: every token picks the first expert and none the
    last (a constant input feature pushes their router logits far up and far down)."""
    config = tiny_config(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        expert_intermediate_size=48,
        norm_topk_prob=norm_topk_prob,
    )
    mlp = ModSquadSparseMLP(config, num_experts)
    hidden = torch.randn(3, 23, HIDDEN)
    with torch.no_grad():
        mlp.router.weight.normal_(0.0, 1.0 / math.sqrt(HIDDEN))
        mlp.experts.up_proj.normal_(0.0, 1.0 / math.sqrt(HIDDEN))
        mlp.experts.down_proj.normal_(0.0, 1.0 / math.sqrt(48))
        mlp.experts.up_proj_bias.normal_(0.0, 0.1)
        mlp.experts.down_proj_bias.normal_(0.0, 0.1)
        if routing == "skewed":
            hidden[..., 0] = 3.0
            mlp.router.weight[0, 0, 0] = 1.0
            mlp.router.weight[0, -1, 0] = -10.0
    return mlp, config, hidden


def _outputs_and_gradients(mlp: ModSquadSparseMLP, hidden: torch.Tensor, grad_out: torch.Tensor) -> dict:
    mlp.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_(True)
    out, routing = mlp(hidden, 0)
    out.backward(grad_out)
    results = {"output": out.detach(), "hidden_states.grad": hidden.grad}
    results.update({f"{name}.grad": param.grad for name, param in mlp.named_parameters()})
    results["top_k_index"] = routing.top_k_index
    return results


@pytest.mark.parametrize("routing_name", list(ROUTINGS))
@pytest.mark.parametrize("implementation", KERNELS)
def test_kernel_matches_eager_outputs_and_gradients(implementation, routing_name, tiny_config):
    mlp, config, hidden = _sparse_mlp(tiny_config, *ROUTINGS[routing_name])
    grad_out = torch.randn_like(hidden)
    config._experts_implementation = "eager"
    expected = _outputs_and_gradients(mlp, hidden, grad_out)
    config._experts_implementation = implementation
    actual = _outputs_and_gradients(mlp, hidden, grad_out)

    counts = torch.bincount(expected["top_k_index"].reshape(-1), minlength=mlp.experts.num_experts)
    if routing_name == "uneven_with_an_empty_expert":
        assert counts[0] == hidden.shape[0] * hidden.shape[1] and counts[-1] == 0  # every token / none
    assert expected["router.weight.grad"].abs().max() > 1e-3  # the routing weights really carry a gradient
    assert set(actual) == set(expected)
    for name in expected:
        assert_close(actual[name], expected[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def test_dispatch_gives_every_slot_its_own_row_reading_its_token():
    top_k_index = torch.tensor([[0, 1]] * 5 + [[2, 1]] * 2 + [[3, 0]])  # counts 6, 7, 2, 1
    dispatch = ExpertDispatch.from_indices(top_k_index, 5)
    assert dispatch.count_list == dispatch.counts.tolist() == [6, 7, 2, 1, 0] and dispatch.num_rows == 16
    assert dispatch.offsets.tolist() == [
        6,
        13,
        15,
        16,
        16,
    ]  # the end row of every expert, as grouped_mm reads them
    assert sorted(dispatch.row_of_slot.tolist()) == list(range(16))
    assert_close(dispatch.token_of_slot[dispatch.row_of_slot], torch.arange(16) // 2)
    expert_of_row = [0] * 6 + [1] * 7 + [2] * 2 + [3]
    assert [expert_of_row[r] for r in dispatch.row_of_slot.tolist()] == top_k_index.reshape(-1).tolist()
    assert dispatch.expert_of_row.tolist() == expert_of_row


def test_sorted_mm_results_do_not_depend_on_unused_experts(tiny_config):
    """An expert's GEMM sees only its own rows: experts nobody chose (a grown model's new experts, as seen by an
    old task) change no bit of the output or of the used experts' gradients."""
    mlp, config, hidden = _sparse_mlp(tiny_config, *ROUTINGS["balanced"])
    config._experts_implementation = SORTED_MM
    tokens = hidden.reshape(-1, HIDDEN)
    top_k_index = torch.randint(0, 4, (tokens.shape[0], 2))
    top_k_weights = torch.rand(tokens.shape[0], 2)
    grown = ModSquadExperts(config, 7)
    with torch.no_grad():
        for name, param in grown.named_parameters():
            param.normal_()
            param[:4] = getattr(mlp.experts, name)
    outputs = []
    for experts in (mlp.experts, grown):
        out = experts(tokens, top_k_index, top_k_weights)
        out.backward(torch.ones_like(out))
        outputs.append((out, experts.up_proj.grad[:4], experts.down_proj_bias.grad[:4]))
    for small, large in zip(*outputs):
        assert torch.equal(small, large)


def test_an_expert_without_tokens_gets_zero_gradients(tiny_config):
    mlp, config, hidden = _sparse_mlp(tiny_config, *ROUTINGS["uneven_with_an_empty_expert"])
    config._experts_implementation = SORTED_MM
    mlp(hidden, 0)[0].sum().backward()
    for param in (
        mlp.experts.up_proj,
        mlp.experts.up_proj_bias,
        mlp.experts.down_proj,
        mlp.experts.down_proj_bias,
    ):
        assert torch.count_nonzero(param.grad[-1]) == 0
        assert torch.count_nonzero(param.grad[0]) > 0


# ------------------------------------------------------------------------------------ whole-model switching
def test_checkpoint_loads_with_any_kernel_and_switches_without_changing_logits(tmp_path, tiny_config):
    model = ModSquadForImageClassification(tiny_config())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, moe.ModSquadTaskRouter):
                module.weight.normal_(0.0, 0.5)  # spread tokens over experts: zero routers pick the same ones
    model.save_pretrained(tmp_path)
    pixel_values = torch.randn(2, 3, 32, 32)

    default = ModSquadForImageClassification.from_pretrained(tmp_path).eval()
    grouped = ModSquadForImageClassification.from_pretrained(
        tmp_path, experts_implementation="grouped_mm"
    ).eval()
    experts = [m for m in grouped.modules() if isinstance(m, ModSquadExperts)]
    assert model.config._experts_implementation == default.config._experts_implementation == AUTO
    assert experts and all(m.config._experts_implementation == "grouped_mm" for m in experts)
    with torch.no_grad():
        logits = {"grouped_mm": grouped(pixel_values).logits, SORTED_MM: default(pixel_values).logits}
        grouped.set_experts_implementation("eager")
        assert all(m.config._experts_implementation == "eager" for m in experts)
        logits["eager"] = grouped(pixel_values).logits
    assert_close(logits["grouped_mm"], logits["eager"], **TOLERANCE)
    assert_close(logits[SORTED_MM], logits["eager"], **TOLERANCE)


# -------------------------------------------------------------------------------------- attention experts
def _naive_attention_experts(module: ModSquadAttentionExperts, hidden: torch.Tensor, routing) -> torch.Tensor:
    """The definition, one token and one chosen expert at a time: the expert's query attends over the keys and
    values every expert shares; its output projection follows; the token sums its experts by routing weight."""
    batch, seq, _ = hidden.shape
    heads, head_dim = module.num_heads, module.head_dim
    keys = module.k_proj(hidden).view(batch, seq, heads, head_dim)
    values = module.v_proj(hidden).view(batch, seq, heads, head_dim)
    rows = []
    for b in range(batch):
        for t in range(seq):
            token = b * seq + t
            out = torch.zeros(hidden.shape[-1])
            for slot in range(module.top_k):
                expert = int(routing.top_k_index[token, slot])
                query = (module.q_proj[expert] @ hidden[b, t] + module.q_proj_bias[expert]).view(
                    heads, head_dim
                )
                attended = []
                for head in range(heads):
                    scores = keys[b, :, head] @ query[head] / math.sqrt(head_dim)
                    attended.append(torch.softmax(scores, dim=0) @ values[b, :, head])
                expert_out = module.o_proj[expert] @ torch.cat(attended) + module.o_proj_bias[expert]
                out = out + routing.top_k_weights[token, slot] * expert_out
            rows.append(out)
    return torch.stack(rows).view(batch, seq, -1)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_attention_experts_match_the_per_token_definition(attn_implementation, top_k, tiny_config):
    config = tiny_config(moe_attention=True, num_experts=4, num_experts_per_tok=top_k)
    config._attn_implementation = attn_implementation
    module = ModSquadAttentionExperts(config, 4, eager_attention_forward)
    with torch.no_grad():
        for name, param in module.named_parameters():
            param.normal_(0.0, 1.0 / math.sqrt(HIDDEN) if "bias" not in name else 0.1)
    hidden = torch.randn(2, 7, HIDDEN, requires_grad=True)

    routings = []  # the router's decision in this very forward (its graph carries the router's gradient)
    module.router.register_forward_hook(lambda _module, _inputs, output: routings.append(output))
    out, _ = module(hidden, 0)
    routing = routings[0]
    assert len(set(routing.top_k_index.reshape(-1).tolist())) > 1  # tokens really go to different experts
    expected = _naive_attention_experts(module, hidden, routing)
    assert_close(out, expected, **TOLERANCE)

    grad_out = torch.randn_like(out)
    params = [
        hidden,
        module.q_proj,
        module.o_proj,
        module.k_proj.weight,
        module.v_proj.weight,
        module.router.weight,
    ]
    # the router is shared by both graphs: keep it for the second pass
    actual_grads = torch.autograd.grad(out, params, grad_out, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    for actual, wanted in zip(actual_grads, expected_grads):
        assert_close(actual, wanted, **TOLERANCE)


# ----------------------------------------------------------------------------------------------- benchmark
def test_benchmark_times_every_kernel_against_dense_and_skips_batched_mm_training():
    case = MoECase("tiny", batch=2, tokens=9, hidden=32, num_experts=4, expert_intermediate_size=16, top_k=2)
    implementations = ["eager", SORTED_MM, "grouped_mm", "batched_mm"]
    measurements = measure_case(case, implementations, repeats=2, warmup=1)

    by_key = {(m.implementation, m.mode): m for m in measurements}
    assert set(by_key) == {(name, mode) for name in implementations for mode in ("fwd", "fwd+bwd")}
    assert by_key[("batched_mm", "fwd+bwd")].skipped.startswith("forward only")
    for m in measurements:
        if m.skipped is None:
            assert m.moe_ms > 0 and m.dense_ms > 0 and m.best_ratio > 0
            assert m.ratio == pytest.approx(m.moe_ms / m.dense_ms)
    table = format_table(case, measurements)
    assert "sorted_mm" in table and "skipped: forward only" in table


def test_benchmark_command_rejects_bad_arguments(capsys):
    assert main(["benchmark", "moe", "--repeats", "0"]) == 2  # a user error: one line, exit status 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse lists the accepted implementations
        main(["benchmark", "moe", "--implementations", "sonicmoe"])
