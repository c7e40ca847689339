"""Auxiliary router losses: task-expert mutual information, its step-wide statistics (also across two processes),
load balancing and z-loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from modsquad import ModSquadModel, RoutingStatistics, task_expert_mutual_information
from modsquad.model.moe import ModSquadTaskRouter, RouterOutput, load_balancing_loss, router_z_loss


# ----------------------------------------------------------------------------------------- mutual information
def test_uniform_routing_has_zero_mutual_information():
    assert task_expert_mutual_information(torch.full((3, 8), 1.0 / 24)).item() == pytest.approx(0.0, abs=1e-7)
    # every task routing alike (not uniform over experts) is still independence
    same = torch.tensor([0.7, 0.2, 0.1]).expand(4, 3)
    assert task_expert_mutual_information(same).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("num_tasks", [2, 4])
def test_tasks_on_disjoint_experts_give_log_num_tasks(num_tasks):
    experts_per_task = 2
    joint = torch.zeros(num_tasks, num_tasks * experts_per_task)
    for task in range(num_tasks):
        joint[task, task * experts_per_task : (task + 1) * experts_per_task] = 1.0
    mi = task_expert_mutual_information(joint)
    assert mi.item() == pytest.approx(math.log(num_tasks), rel=1e-6)


def test_intermediate_case_matches_hand_computation():
    joint = torch.tensor([[0.3, 0.1], [0.1, 0.5]])
    # P(T) = P(E) = (0.4, 0.6); I = sum p(t,e) log(p(t,e) / (p(t) p(e)))
    expected = (
        0.3 * math.log(0.3 / (0.4 * 0.4))
        + 0.1 * math.log(0.1 / (0.4 * 0.6))
        + 0.1 * math.log(0.1 / (0.6 * 0.4))
        + 0.5 * math.log(0.5 / (0.6 * 0.6))
    )
    assert task_expert_mutual_information(joint).item() == pytest.approx(expected, rel=1e-6)
    # unnormalised mass (summed router probabilities) gives the same value
    assert task_expert_mutual_information(joint * 37.0).item() == pytest.approx(expected, rel=1e-6)
    # a task with no mass does not count
    padded = torch.cat([joint, torch.zeros(1, 2)])
    assert task_expert_mutual_information(padded).item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------- routing statistics
def _router_probs(seed: int, tokens: int, experts: tuple[int, ...] = (4, 6)) -> list[torch.Tensor]:
    """Leaf router logits (so that gradients can be read) of one batch, one tensor per router."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, e, generator=generator).mul_(2.0).requires_grad_() for e in experts]


def _softmax(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.softmax(x, dim=-1) for x in logits]


def test_one_task_seen_gives_exactly_zero_mutual_information():
    logits = _router_probs(seed=0, tokens=12)
    stats = RoutingStatistics(num_tasks=3)
    stats.update(1, _softmax(logits))
    stats.update(1, _softmax(_router_probs(seed=1, tokens=5)))  # more batches of the same task change nothing
    assert stats.tasks_seen == [1]
    assert stats.mutual_information().item() == 0.0
    stats.mutual_information_loss().backward()
    assert all(torch.count_nonzero(x.grad) == 0 for x in logits)


def test_two_task_batches_give_the_mutual_information_of_the_combined_joint():
    logits_a, logits_b = _router_probs(seed=0, tokens=12), _router_probs(seed=1, tokens=7)
    stats = RoutingStatistics(num_tasks=2)
    stats.update(0, _softmax(logits_a))
    stats.update(1, _softmax(logits_b))
    assert stats.tasks_seen == [0, 1]

    expected = 0.0
    for router, (a, b) in enumerate(zip(_softmax(logits_a), _softmax(logits_b))):
        mass = torch.stack([a.sum(0), b.sum(0)])
        assert torch.allclose(stats.joint()[router], mass / mass.sum())
        expected += task_expert_mutual_information(mass).item()
    assert expected > 0.0
    assert stats.mutual_information().item() == pytest.approx(expected, rel=1e-6)
    assert stats.mutual_information_loss().item() == pytest.approx(-expected, rel=1e-6)

    stats.mutual_information_loss().backward()
    for x in (*logits_a, *logits_b):
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradient_reaches_both_task_batches_router_weights(all_tasks, tiny_config):
    model = ModSquadModel(tiny_config(all_tasks[:2])).train()
    routers = [m for m in model.modules() if isinstance(m, ModSquadTaskRouter)]
    with torch.no_grad():
        for router in routers:
            router.weight.normal_(0.0, 0.3)
    stats = RoutingStatistics(num_tasks=2)
    stats.update(0, model(torch.randn(2, 3, 32, 32), task="cls", output_router_logits=True).router_probs)
    stats.update(1, model(torch.randn(3, 3, 32, 32), task="seg", output_router_logits=True).router_probs)
    stats.mutual_information_loss().backward()
    for router in routers:
        assert router.weight.grad[0].abs().sum() > 0  # the "cls" router, through the first batch
        assert router.weight.grad[1].abs().sum() > 0  # the "seg" router, through the second


def test_statistics_reject_misuse():
    stats = RoutingStatistics(num_tasks=2)
    for empty_call in (stats.mutual_information, stats.mutual_information_loss, stats.joint):
        with pytest.raises(RuntimeError, match="empty"):
            empty_call()
    with pytest.raises(ValueError, match="task_id=2"):
        stats.update(2, _softmax(_router_probs(0, 4)))
    stats.update(0, _softmax(_router_probs(0, 4)))
    with pytest.raises(ValueError, match="got 1 routers, expected 2"):
        stats.update(1, _softmax(_router_probs(1, 4, experts=(4,))))
    stats.all_reduce()  # no process group: a no-op that still closes the step
    with pytest.raises(RuntimeError, match="reset"):
        stats.update(1, _softmax(_router_probs(1, 4)))
    stats.reset()
    assert stats.tasks_seen == []


# ------------------------------------------------------------------------------------ two processes, all-reduce
_BATCH_TOKENS = (12, 7)  # rank r holds one batch of task r


def _all_reduce_worker(rank: int, world_size: int, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        logits = _router_probs(seed=rank, tokens=_BATCH_TOKENS[rank])
        stats = RoutingStatistics(num_tasks=world_size)
        stats.update(rank, _softmax(logits))
        stats.all_reduce()
        loss = stats.mutual_information_loss()
        loss.backward()
        torch.save(
            {"tasks_seen": stats.tasks_seen, "loss": loss.detach(), "grads": [x.grad for x in logits]},
            Path(folder) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_across_two_processes_matches_single_process(tmp_path):
    mp.spawn(_all_reduce_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    # the same step in one process, with both batches
    logits = [_router_probs(seed=rank, tokens=_BATCH_TOKENS[rank]) for rank in range(2)]
    stats = RoutingStatistics(num_tasks=2)
    for rank in range(2):
        stats.update(rank, _softmax(logits[rank]))
    loss = stats.mutual_information_loss()
    loss.backward()
    assert loss.item() < 0.0

    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["tasks_seen"] == [0, 1]
        assert result["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        for grad, reference in zip(result["grads"], logits[rank]):
            assert torch.allclose(grad, reference.grad, atol=1e-7)


# ----------------------------------------------------------------------------------- balance and z-loss
def _routing(probs: torch.Tensor, top_k_index: torch.Tensor) -> RouterOutput:
    logits = probs.log()
    weights = probs.gather(-1, top_k_index)
    return RouterOutput(logits=logits, probs=probs, top_k_index=top_k_index, top_k_weights=weights)


def test_load_balancing_loss_is_one_when_balanced_and_larger_otherwise():
    uniform = torch.full((4, 4), 0.25)
    balanced = _routing(uniform, torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]]))
    assert load_balancing_loss([balanced]).item() == pytest.approx(1.0)

    # every token to experts 0 and 1, which also get most of the probability:
    # f = (1/2, 1/2, 0, 0), P = (0.4, 0.4, 0.1, 0.1) -> 4 * (0.2 + 0.2) = 1.6
    skewed_probs = torch.tensor([0.4, 0.4, 0.1, 0.1]).expand(4, 4)
    skewed = _routing(skewed_probs, torch.tensor([[0, 1]] * 4))
    assert load_balancing_loss([skewed]).item() == pytest.approx(1.6)
    # averaged over routers
    assert load_balancing_loss([balanced, skewed]).item() == pytest.approx(1.3)


def test_router_z_loss_is_mean_squared_logsumexp():
    torch.manual_seed(0)
    routings = [
        _routing(torch.softmax(torch.randn(5, n), -1), torch.zeros(5, 1, dtype=torch.long)) for n in (3, 4)
    ]
    routings = [routing._replace(logits=torch.randn_like(routing.logits) * 3.0) for routing in routings]
    by_hand = []
    for routing in routings:
        rows = routing.logits.tolist()
        by_hand.append(sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows))
    assert router_z_loss(routings).item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)


def test_backbone_losses_at_initialisation(tiny_config):
    """Zero routers: uniform probabilities, so balance is exactly 1 and z-loss is log(num_experts)^2."""
    config = tiny_config(balance_loss_coef=0.3, z_loss_coef=0.01, router_init_std=0.0)
    out = ModSquadModel(config)(torch.randn(2, 3, 32, 32), output_router_logits=True)
    assert out.balance_loss.item() == pytest.approx(1.0)
    assert out.z_loss.item() == pytest.approx(math.log(4) ** 2, rel=1e-5)
    assert out.aux_loss.item() == pytest.approx(0.3 + 0.01 * math.log(4) ** 2, rel=1e-5)
