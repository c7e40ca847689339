"""The streaming task-expert statistic: its gradient against the exact one, single-task steps, one task graph at a
time, its saved state."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from modsquad import ModSquadForMultiTask
from modsquad.model.moe import task_expert_mutual_information
from modsquad.training.recipe import load_recipe
from modsquad.training.step import MultiTaskStep, StreamingRoutingStatistics, TaskLossWeighting

pytestmark = pytest.mark.usefixtures("one_thread")

TWO_TASKS = [
    {"name": "colour", "type": "image-classification", "num_labels": 3},
    {"name": "bright", "type": "image-classification", "num_labels": 2},
]


# Single-task steps drawn at rates 0.6, 0.3 and 0.1 (a sampler with one micro-batch per step), in a fixed order.
SAMPLER_PATTERN = [0, 0, 1, 0, 0, 1, 0, 2, 0, 1]
RATES = [0.6, 0.3, 0.1]


def fixed_router(num_tasks=3, num_experts=8, hidden=16, tokens=128, steps=120, seed=0):
    """Per-task router weights (with grad) and the tokens of `steps` single-task micro-batches, tasks drawn as in
    `SAMPLER_PATTERN`: router probabilities from a fixed distribution per task."""
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(num_tasks, num_experts, hidden, generator=generator) * 0.5).requires_grad_(True)
    tasks = [SAMPLER_PATTERN[j % len(SAMPLER_PATTERN)] for j in range(steps)]
    batches = [(task, torch.randn(tokens, hidden, generator=generator)) for task in tasks]
    return weight, batches


def mean_probs(weight, task, tokens):
    return torch.softmax(tokens @ weight[task].T, dim=-1).mean(dim=0)


def streaming_gradient(weight, history, current, task_rates):
    stats = StreamingRoutingStatistics(
        num_tasks=3, horizon=1e9, task_rates=task_rates
    )  # the plain running mean
    with torch.no_grad():
        for task, tokens in history:
            stats.observe(task, [mean_probs(weight, task, tokens)])
    weight.grad = None
    for task, tokens in current:
        stats.observe(task, [mean_probs(weight, task, tokens)]).backward()
    return weight.grad.clone()


def test_streaming_gradient_agrees_with_the_exact_full_window_gradient():
    # The window: 60 earlier single-task steps (constants by now) and the 60 steps being trained, in one graph, each
    # task's routing the mean over its micro-batches. Streaming sees them one at a time.
    weight, batches = fixed_router()
    history, current = batches[:60], batches[60:]
    weight.grad = None
    means = [mean_probs(weight, t, x).detach() for t, x in history] + [
        mean_probs(weight, t, x) for t, x in current
    ]
    tasks = [t for t, _ in batches]
    joint = torch.stack(
        [torch.stack([m for m, t in zip(means, tasks) if t == task]).mean(0) for task in range(3)]
    )
    (-task_expert_mutual_information(joint / 3)).backward()
    exact = weight.grad.clone()

    streaming = streaming_gradient(weight, history, current, RATES)
    assert F.cosine_similarity(streaming.flatten(), exact.flatten(), dim=0) >= 0.99
    # Each micro-batch gets its task's whole gradient (divided by the task's rate), not its share of the window's:
    # summed over the window, the exact gradient times the window's length in steps.
    assert streaming.norm() / exact.norm() == pytest.approx(120, rel=0.1)
    # Without the rates, rarely drawn tasks would get their share of the gradient only as often as they are drawn.
    unweighted = streaming_gradient(weight, history, current, None)
    assert F.cosine_similarity(unweighted.flatten(), exact.flatten(), dim=0) < 0.9


def test_a_micro_batch_gets_the_gradient_of_the_discounted_window_through_its_own_share():
    weight, batches = fixed_router(steps=12)
    stats = StreamingRoutingStatistics(num_tasks=3, horizon=3)
    with torch.no_grad():
        for task, tokens in batches[:-1]:
            stats.observe(task, [mean_probs(weight, task, tokens)])
    task, tokens = batches[-1]
    stats.observe(task, [mean_probs(weight, task, tokens)]).backward()
    streaming = weight.grad.clone()

    # The window by hand: each task's observations discounted by beta per later observation of that task.
    weight.grad = None
    beta = 1 - 1 / 3
    rows, last_weight = [], None
    for t in range(3):
        mine = [(i, x) for i, (task_i, x) in enumerate(batches) if task_i == t]
        weights = torch.tensor([beta ** (len(mine) - 1 - k) for k in range(len(mine))])
        probs = [
            mean_probs(weight, t, x) if i == len(batches) - 1 else mean_probs(weight, t, x).detach()
            for i, x in mine
        ]
        rows.append((torch.stack(probs) * weights[:, None]).sum(0) / weights.sum())
        if t == task:
            last_weight = weights[-1] / weights.sum()
    (-task_expert_mutual_information(torch.stack(rows) / 3)).backward()
    assert torch.allclose(streaming * last_weight, weight.grad, atol=1e-7)


def random_routers(model, std=0.5):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "router" in name:
                param.normal_(0, std)
    return model


def batch(labels, seed):
    images = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return {"pixel_values": images, "labels": torch.tensor(labels)}


def router_grads(model):
    return [p.grad for n, p in model.named_parameters() if "router" in n]


def test_single_task_steps_get_the_mutual_information_gradient_only_from_the_streaming_estimator(tiny_config):
    model = random_routers(ModSquadForMultiTask(tiny_config(TWO_TASKS, mi_loss_coef=1.0, z_loss_coef=0.0)))
    no_task_loss = TaskLossWeighting(model.config.task_names, [0.0, 0.0])  # router grads come from MI alone
    colour, bright = ("colour", batch([0, 1, 2, 0], 0)), ("bright", batch([1, 0, 1, 0], 1))

    per_step = MultiTaskStep(model, no_task_loss)
    per_step([colour, bright])
    model.zero_grad()
    out = per_step([colour])
    out.loss.backward()
    assert out.mi_loss == 0 and all(g is None or g.abs().sum() == 0 for g in router_grads(model))

    streaming = MultiTaskStep(model, no_task_loss, routing_estimate=StreamingRoutingStatistics(2, horizon=5))
    streaming([bright])  # the estimate remembers how "bright" routes
    model.zero_grad()
    out = streaming([colour])
    assert out.mi_loss < 0  # -I(T;E) of the running estimate
    out.loss.backward()
    grads = router_grads(model)
    assert grads and all(g is not None for g in grads)
    # Only the colour routers learn: the single-task step differentiates its own task's share.
    assert all(g[0].abs().sum() > 0 and g[1].abs().sum() == 0 for g in grads)


def test_one_task_graph_at_a_time_gives_the_gradients_of_one_graph(tiny_config):
    model = random_routers(ModSquadForMultiTask(tiny_config(TWO_TASKS, mi_loss_coef=0.5)))
    twin = copy.deepcopy(model)
    steps = [
        [("colour", batch([0, 1, 2, 0], 0)), ("bright", batch([1, 0, 1, 0], 1))],
        [
            ("colour", batch([2, 2, 1, 0], 2)),
            ("colour", batch([1, 0, 0, 2], 3)),
            ("bright", batch([0, 0, 1, 1], 4)),
        ],
    ]
    one_graph = MultiTaskStep(model, routing_estimate=StreamingRoutingStatistics(2, horizon=4))
    per_task = MultiTaskStep(twin, routing_estimate=StreamingRoutingStatistics(2, horizon=4))
    for micro_batches in steps:
        model.zero_grad()
        twin.zero_grad()
        out = one_graph(micro_batches)
        out.loss.backward()
        for micro_batch in micro_batches:
            per_task([micro_batch]).loss.backward()
        for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert out.mi_loss < 0
    for key, value in one_graph.routing_estimate.state_dict().items():
        assert torch.equal(
            torch.as_tensor(value), torch.as_tensor(per_task.routing_estimate.state_dict()[key])
        ), key


def test_state_dict_round_trip_and_mismatches():
    stats = StreamingRoutingStatistics(num_tasks=2, horizon=4)
    stats.observe(0, [torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.5, 0.0])])
    stats.observe(1, [torch.tensor([0.1, 0.1, 0.8]), torch.tensor([0.0, 0.5, 0.5])])
    state = stats.state_dict()
    assert all(isinstance(v, (torch.Tensor, float)) for v in state.values())  # tensors and plain numbers only
    restored = StreamingRoutingStatistics(num_tasks=2, horizon=4)
    restored.load_state_dict(state)
    assert restored.mutual_information_per_router() == stats.mutual_information_per_router()
    assert stats.mutual_information() > 0

    with pytest.raises(ValueError, match=r"horizon 4\.0, this run uses 8\.0"):
        StreamingRoutingStatistics(num_tasks=2, horizon=8).load_state_dict(state)
    with pytest.raises(ValueError, match="cover 2 tasks, this model has 3"):
        StreamingRoutingStatistics(num_tasks=3, horizon=4).load_state_dict(state)
    with pytest.raises(ValueError, match="horizon must be a number >= 1"):
        StreamingRoutingStatistics(num_tasks=2, horizon=0.5)
    with pytest.raises(ValueError, match=r"task_rates must hold one number > 0 per task \(2\)"):
        StreamingRoutingStatistics(num_tasks=2, task_rates=[1.0, 0.0])
    with pytest.raises(ValueError, match="task_id=2 is out of range"):
        stats.observe(2, [torch.ones(3) / 3, torch.ones(3) / 3])


def test_recipe_options_of_the_estimator():
    tasks = [{"name": "a"}, {"name": "b"}]
    recipe = load_recipe(
        tasks=tasks,
        optimization={"mi_estimator": "streaming", "mi_horizon": 50},
        training={"one_task_at_a_time": True},
    )
    assert (recipe.optimization.mi_estimator, recipe.training.one_task_at_a_time) == ("streaming", True)
    with pytest.raises(ValueError, match=r"needs optimization\.mi_estimator='streaming'"):
        load_recipe(tasks=tasks, training={"one_task_at_a_time": True})
    with pytest.raises(ValueError, match="contradicts one_task_at_a_time=true"):
        load_recipe(
            tasks=tasks,
            optimization={"mi_estimator": "streaming"},
            training={"one_task_at_a_time": True, "find_unused_parameters": False},
        )
    with pytest.raises(ValueError, match=r"mi_estimator='window'; accepted: \['step', 'streaming'\]"):
        load_recipe(tasks=tasks, optimization={"mi_estimator": "window"})
