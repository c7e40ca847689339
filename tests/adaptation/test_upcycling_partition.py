"""Compute-matched upcycling (`upcycling_mode="partition"`): experts cut from the dense MLP's hidden units, k active
experts costing one dense MLP, exact at initialisation with grouped routers and an approximation without them."""

from __future__ import annotations

import pytest
import torch

from modsquad import ModSquadModel

TOLERANCE = dict(atol=2e-5, rtol=1e-5)


def dense_blocks(dense):
    return dense.encoder.layer if dense.config.model_type == "dinov2" else dense.layers


def dense_mlp(dense, index: int, x: torch.Tensor) -> torch.Tensor:
    """The dense MLP branch of block `index` (DINOv2's layer scale included), on normed tokens `x`."""
    block = dense_blocks(dense)[index]
    out = block.mlp(x)
    return block.layer_scale2(out) if dense.config.model_type == "dinov2" else out


def partitioned(dense, tasks, **overrides):
    options = dict(num_experts=8, num_experts_per_tok=4, moe_layers="all", tasks=tasks)
    return ModSquadModel.from_dense(dense, upcycling_mode="partition", **{**options, **overrides})


@pytest.fixture
def one_task(all_tasks):
    return all_tasks[:1]


def test_partition_experts_are_slices_of_the_dense_mlp_at_its_compute(make_dense, one_task):
    dense = make_dense()
    model = partitioned(dense, one_task)
    copied = ModSquadModel.from_dense(
        dense, num_experts=8, num_experts_per_tok=4, moe_layers="all", tasks=one_task
    )
    config = model.config
    # k active experts of width I / k: the active hidden width of a token is the dense MLP's.
    assert config.expert_intermediate_size * config.num_experts_per_tok == config.intermediate_size == 128
    assert copied.config.expert_intermediate_size == 128
    experts = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)  # noqa: E731
    assert experts(model) < 0.3 * experts(copied)

    # The identity behind the mode: an MLP is a sum over its hidden units, so the k slices of one group, each with
    # weight 1 (the x k of their down projections undone by the 1/k mixing weight) and the bias b2 counted once,
    # add up to the dense MLP; any group does.
    x = torch.randn(10, 64)
    sparse = model.layers[2].mlp.experts
    k = config.num_experts_per_tok
    for group in range(config.num_experts // k):
        total = torch.zeros(10, 64)
        for expert in range(group * k, (group + 1) * k):
            hidden = torch.nn.functional.linear(x, sparse.up_proj[expert], sparse.up_proj_bias[expert])
            out = torch.nn.functional.linear(
                sparse.act_fn(hidden), sparse.down_proj[expert], sparse.down_proj_bias[expert]
            )
            total += out / k
        with torch.no_grad():
            torch.testing.assert_close(total.detach(), dense_mlp(dense, 2, x), **TOLERANCE)


def test_partition_upcycled_model_reproduces_the_dense_blocks(make_dense, all_tasks):
    dense = make_dense()
    model = partitioned(dense, all_tasks[:2], moe_layers="every_other")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = model(pixel_values, task=1, output_hidden_states=True, output_router_logits=True)
        states = [output.hidden_states[0]]
        for block in dense_blocks(dense):
            states.append(block(states[-1]))
        reference = [*states, dense.layernorm(states[-1])]
    ours = [*output.hidden_states, output.last_hidden_state]
    for i, (a, b) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m, i=i: f"hidden state {i}: {m}")
    k = model.config.num_experts_per_tok
    for indices in output.expert_indices:
        groups = indices // k
        # Every token's top-k is one whole group (every slice once)...
        assert torch.equal(groups.min(dim=-1).values, groups.max(dim=-1).values)
        assert torch.equal(indices.sort(dim=-1).values % k, torch.arange(k).expand_as(indices))
        # ...and the tokens spread over the groups, which then learn from different tokens.
        assert groups.unique().numel() == model.config.num_experts // k


def test_partition_with_independent_routers_only_approximates_the_dense_mlp(one_task, dinov2):
    """Router rows drawn independently (as copy mode draws them) mix slices from different groups: some slices are
    missing, others counted twice. The block then computes an unbiased but noisy estimate of the dense MLP; on this
    tiny model (top-4 of 8) its relative error is about 0.65, against ~1e-7 with the grouped routers."""
    dense = dinov2()
    model = partitioned(dense, one_task)
    block = model.layers[1]
    x = block.norm2(torch.randn(256, 64))
    with torch.no_grad():
        expected = dense_mlp(dense, 1, x)
        grouped, _ = block.mlp(x, 0)
        torch.nn.init.normal_(block.mlp.router.weight, std=model.config.initializer_range)
        independent, routing = block.mlp(x, 0)
    error = lambda out: ((out - expected).norm() / expected.norm()).item()  # noqa: E731
    assert error(grouped) < 1e-5
    assert 0.1 < error(independent) < 1.0
    # Exactness is lost precisely where a token's top-k misses a slice.
    missing = (routing.top_k_index % model.config.num_experts_per_tok).sort(dim=-1).values != torch.arange(4)
    assert missing.any(dim=-1).float().mean() > 0.5


def test_partition_mode_errors(one_task, vit):
    dense = vit()
    with pytest.raises(ValueError, match="num_experts_per_tok=3 equal slices; accepted num_experts_per_tok"):
        partitioned(dense, one_task, num_experts=6, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="num_experts must be a multiple of 4"):
        partitioned(dense, one_task, num_experts=6)
    with pytest.raises(
        ValueError, match=r"router_init_std=0.0: upcycling mode 'partition' needs random routers"
    ):
        ModSquadModel.from_dense(
            dense, upcycling_mode="partition", router_init_std=0.0, num_experts=8, tasks=one_task
        )
    with pytest.raises(ValueError, match="upcycling mode 'slices'; accepted: \\['copy', 'partition'\\]"):
        ModSquadModel.from_dense(dense, upcycling_mode="slices", tasks=one_task)
    # A copied field may be given with the checkpoint's own value, never another one.
    assert partitioned(dense, one_task, hidden_size=64, expert_intermediate_size=32).config.hidden_size == 64
    with pytest.raises(ValueError, match="expert_intermediate_size=128 but the checkpoint has 32"):
        partitioned(dense, one_task, expert_intermediate_size=128)
