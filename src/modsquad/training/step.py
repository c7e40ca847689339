"""One multi-task training step as a single module forward: every task micro-batch of the step, the weighted task
losses, the per-batch auxiliary router losses and the step's task-expert mutual-information loss.

Why one module: the mutual-information loss is a function of the routing statistics of *all* task batches of the step
(with a single task it is identically zero), so its gradient is only exact when the step is one graph with one
backward. Under DistributedDataParallel several forwards before one backward break the gradient reducer; wrapping the
whole step in one `forward` (this module is what `accelerator.prepare` wraps) makes the step one DDP forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import ModelOutput

from ..model.modeling_multitask import ModSquadForMultiTask
from ..model.moe import task_expert_mutual_information


class RoutingStatistics:
    """Accumulates the joint task-expert router probabilities over the task batches of one optimizer step.

    The mutual-information loss is a function of this joint distribution, so it is only meaningful once several
    tasks have been seen: with a single task it is identically zero. The training loop calls `reset()` at the start
    of each step, `update(task_id, outputs.router_probs)` after each task batch's forward (run with
    `output_router_logits=True`), `all_reduce()` when several processes train together, then adds `config.mi_loss_coef * stats.mutual_information_loss()` to the
    loss before the step's backward. Gradients flow into every batch's router probabilities that took part.

    Args:
        num_tasks (`int`): number of tasks of the model.
    """

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks
        self.reset()

    def reset(self) -> None:
        self._mass: list[torch.Tensor] | None = None  # per router: (num_tasks, num_experts), with grad
        self._tokens: torch.Tensor | None = None  # (num_tasks,) tokens seen per task
        self._reduced = False

    @property
    def tasks_seen(self) -> list[int]:
        if self._tokens is None:
            return []
        return [t for t in range(self.num_tasks) if self._tokens[t] > 0]

    def update(self, task_id: int, router_probs: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> None:
        """Adds one task batch. `router_probs`: one `(tokens, num_experts)` tensor per router, in model order."""
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id={task_id} is out of range for {self.num_tasks} tasks")
        if self._reduced:
            raise RuntimeError("RoutingStatistics were already all-reduced for this step; call reset() first")
        if router_probs is None:
            raise ValueError("router_probs is None: run the model with output_router_logits=True to get them")
        if not router_probs:
            raise ValueError("router_probs is empty: the model has no MoE blocks to take statistics from")
        sums = [p.float().sum(dim=0) for p in router_probs]
        if self._mass is None:
            device = sums[0].device
            self._mass = [torch.zeros(self.num_tasks, s.shape[0], device=device) for s in sums]
            self._tokens = torch.zeros(self.num_tasks, device=device)
        if len(sums) != len(self._mass):
            raise ValueError(f"got {len(sums)} routers, expected {len(self._mass)} as in the first update")
        one_hot = F.one_hot(torch.tensor(task_id, device=sums[0].device), self.num_tasks).float().unsqueeze(1)
        self._mass = [mass + one_hot * s.unsqueeze(0) for mass, s in zip(self._mass, sums)]
        self._tokens = self._tokens + one_hot.squeeze(1) * router_probs[0].shape[0]

    def all_reduce(self) -> None:
        """Sums the statistics over every process (no-op without an initialised process group).

        Each process keeps the gradient path to its own batches; the other processes' mass enters as a constant,
        so the gradient every process computes is the one of the global loss with respect to its own batches.
        """
        if (
            self._mass is None
            or not (dist.is_available() and dist.is_initialized())
            or dist.get_world_size() == 1
        ):
            self._reduced = True
            return
        reduced = []
        for mass in self._mass:
            total = mass.detach().clone()
            dist.all_reduce(total)
            reduced.append(mass + (total - mass.detach()))
        tokens = self._tokens.clone()
        dist.all_reduce(tokens)
        self._mass, self._tokens, self._reduced = reduced, tokens, True

    def joint(self) -> list[torch.Tensor]:
        """Per router, the joint distribution `P(task, expert)` of this step."""
        if self._mass is None:
            raise RuntimeError("RoutingStatistics are empty: call update() with some task batches first")
        return [mass / mass.sum().clamp_min(1e-12) for mass in self._mass]

    def mutual_information(self) -> torch.Tensor:
        """`sum over routers of I(T;E)` for this step, in nats."""
        if self._mass is None:
            raise RuntimeError("RoutingStatistics are empty: call update() with some task batches first")
        return torch.stack([task_expert_mutual_information(mass) for mass in self._mass]).sum()

    def mutual_information_loss(self) -> torch.Tensor:
        """`-sum over routers of I(T;E)`: minimising it makes experts specialise by task yet stay used overall."""
        return -self.mutual_information()


def global_loss_scales(counts: torch.Tensor, world_size: int) -> torch.Tensor:
    r"""
    Factors that turn per-process task losses into shares of the loss of the global batch.

    A head's loss is an average over what its batch holds (images, labelled pixels, boxes: its `loss_count`), so on
    each process it is normalised by the *local* count, and DDP's gradient averaging then weighs a process with few
    boxes or labelled pixels like one with many: a two-process run would not equal one process on the same global
    batch. Multiplying each micro-batch's loss by `max(local count, 1) * world_size / max(global count, 1)` makes the
    averaged gradient exactly that of the global batch's loss. One process: all ones, no communication.

    Args:
        counts (`torch.Tensor` of shape `(num_micro_batches,)`): this process's `loss_count` of each micro-batch of
            the step (the same micro-batch layout on every process: the mixer draws the same tasks everywhere).
        world_size (`int`): data-parallel processes.

    Returns:
        `torch.Tensor` of shape `(num_micro_batches,)`.
    """
    counts = counts.float()
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return torch.ones_like(counts)
    total = counts.clone()
    dist.all_reduce(total)
    return counts.clamp_min(1.0) * world_size / total.clamp_min(1.0)


class TaskLossWeighting(nn.Module):
    r"""
    Per-task loss weights: fixed, or learned homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, 2018).

    Under `"uncertainty"` each task has a learned log-variance `s_t` (initialised to 0) and contributes
    `w_t * exp(-s_t) * L_t + s_t`: a task whose loss stays large gets a smaller weight, and the `+ s_t` term keeps the
    weights from collapsing to zero. `w_t` is the task's fixed weight (its prior).

    Args:
        task_names (`list[str]`): the model's tasks, in task-id order.
        weights (`list[float]`, *optional*): fixed weights, default 1 each.
        mode (`str`, *optional*, defaults to `"fixed"`): `"fixed"` or `"uncertainty"`.
    """

    def __init__(self, task_names: list[str], weights: list[float] | None = None, mode: str = "fixed"):
        super().__init__()
        if mode not in ("fixed", "uncertainty"):
            raise ValueError(f"loss weighting mode={mode!r}; accepted: ['fixed', 'uncertainty']")
        weights = [1.0] * len(task_names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(task_names) or any(w < 0 for w in weights):
            raise ValueError(f"need one weight >= 0 per task {task_names}, got {weights}")
        self.task_names = list(task_names)
        self.mode = mode
        self.register_buffer("weights", torch.tensor(weights), persistent=False)
        self.log_vars = nn.Parameter(torch.zeros(len(task_names))) if mode == "uncertainty" else None

    def forward(self, task_id: int, loss: torch.Tensor) -> torch.Tensor:
        """The weighted contribution of one task batch's loss."""
        weighted = self.weights[task_id] * loss
        if self.log_vars is None:
            return weighted
        log_var = self.log_vars[task_id]
        return torch.exp(-log_var) * weighted + log_var

    def effective_weights(self) -> dict[str, float]:
        """The weight each task loss currently gets (for logging)."""
        weights = self.weights.detach().float()
        if self.log_vars is not None:
            weights = weights * torch.exp(-self.log_vars.detach().float())
        return dict(zip(self.task_names, weights.tolist()))


@dataclass
class MultiTaskStepOutput(ModelOutput):
    r"""
    Output of [`MultiTaskStep`].

    Args:
        loss (`torch.FloatTensor`): what to back-propagate: weighted task losses + auxiliary losses +
            `mi_loss_coef * world_size * mi_loss` (scaled so that DDP's gradient averaging yields the gradient of the
            global mutual information).
        task_losses (`torch.FloatTensor` of shape `(num_tasks,)`): detached sum of each task's losses (task loss
            without the auxiliary loss) over its micro-batches of this step; under several processes each is this
            process's share of the global batch's loss (see [`global_loss_scales`]), so their mean over processes is
            the global loss.
        task_counts (`torch.FloatTensor` of shape `(num_tasks,)`): micro-batches of each task in this step.
        aux_loss (`torch.FloatTensor`): detached sum of the per-batch auxiliary router losses.
        mi_loss (`torch.FloatTensor`): detached `-I(T;E)` of the step, over every process (0 with fewer than two tasks).
        expert_counts (`tuple(torch.FloatTensor)`): per router, `(num_tasks, num_experts)` top-k selections of this
            process in this step.
    """

    loss: torch.FloatTensor | None = None
    task_losses: torch.FloatTensor | None = None
    task_counts: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    mi_loss: torch.FloatTensor | None = None
    expert_counts: tuple[torch.FloatTensor, ...] | None = None


class MultiTaskStep(nn.Module):
    r"""
    Runs all task micro-batches of one step through a [`ModSquadForMultiTask`] and returns the step's total loss.

    The routing statistics of the step's batches are accumulated in a [`RoutingStatistics`], all-reduced across
    processes, and the mutual-information loss is taken once over them, so it sees every task of the step.

    Args:
        model ([`ModSquadForMultiTask`]): the model (its parameters are this module's `model.*`).
        weighting ([`TaskLossWeighting`], *optional*): task loss weights; fixed unit weights by default.
        world_size (`int`, *optional*, defaults to 1): number of data-parallel processes. DDP averages gradients,
            while each process's mutual-information loss already covers the global statistics; multiplying it by
            `world_size` makes the averaged gradient that of the global loss.

    Example:

    ```python
    >>> step = MultiTaskStep(ModSquadForMultiTask(config))
    >>> out = step([("cls", {"pixel_values": x1, "labels": y1}), ("seg", {"pixel_values": x2, "labels": y2})])
    >>> out.loss.backward()
    ```"""

    def __init__(
        self, model: ModSquadForMultiTask, weighting: TaskLossWeighting | None = None, world_size: int = 1
    ):
        super().__init__()
        self.model = model
        self.weighting = weighting if weighting is not None else TaskLossWeighting(model.config.task_names)
        if self.weighting.task_names != model.config.task_names:
            raise ValueError(
                f"loss weighting tasks {self.weighting.task_names} differ from the model's {model.config.task_names}"
            )
        self.world_size = world_size

    def forward(self, micro_batches: list[tuple[str, dict]]) -> MultiTaskStepOutput:
        r"""
        Args:
            micro_batches (`list[tuple[str, dict]]`): `(task, batch)` pairs; a batch holds `pixel_values` and
                `labels` in the format of the task's head.
        """
        if not micro_batches:
            raise ValueError("a multi-task step needs at least one (task, batch) micro-batch")
        config = self.model.config
        num_tasks = config.num_tasks
        device = next(self.model.parameters()).device
        stats = RoutingStatistics(num_tasks)
        total = torch.zeros((), device=device)
        task_losses = torch.zeros(num_tasks, device=device)
        task_counts = torch.zeros(num_tasks, device=device)
        aux_total = torch.zeros((), device=device)
        expert_counts: list[torch.Tensor] | None = None
        for task, batch in micro_batches:
            if "pixel_values" not in batch or "labels" not in batch:
                raise ValueError(
                    f"task {task!r}: a batch needs 'pixel_values' and 'labels', got keys {sorted(batch)}"
                )
        scales = global_loss_scales(
            torch.stack(
                [
                    self.model.heads[config.task_names[config.task_index(task)]].loss_count(batch["labels"])
                    for task, batch in micro_batches
                ]
            ).to(device),
            self.world_size,
        )
        for (task, batch), scale in zip(micro_batches, scales):
            task_id = config.task_index(task)
            # The routing tensors (and the aux loss inside `loss`) are asked for explicitly: they are off by default.
            out = self.model(
                pixel_values=batch["pixel_values"],
                task=task_id,
                labels=batch["labels"],
                output_router_logits=True,
            )
            aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=device)
            # The head's loss already includes the batch's aux loss; weight only the task part, normalised over
            # the global batch (see `global_loss_scales`).
            task_loss = (out.loss - aux) * scale
            total = total + self.weighting(task_id, task_loss) + aux
            task_losses[task_id] += task_loss.detach().float()
            task_counts[task_id] += 1
            aux_total = aux_total + aux.detach().float()
            if out.router_probs:
                stats.update(task_id, out.router_probs)
                expert_counts = _add_expert_counts(
                    expert_counts, task_id, out.expert_indices, out.router_probs, num_tasks
                )

        mi_loss = torch.zeros((), device=device)
        if config.mi_loss_coef > 0 and expert_counts is not None:
            stats.all_reduce()
            # With one task in the whole step the mutual information is identically zero: skip the dead graph.
            if len(stats.tasks_seen) >= 2:
                mi_loss = stats.mutual_information_loss()
                total = total + config.mi_loss_coef * self.world_size * mi_loss
        return MultiTaskStepOutput(
            loss=total,
            task_losses=task_losses,
            task_counts=task_counts,
            aux_loss=aux_total,
            mi_loss=mi_loss.detach(),
            expert_counts=tuple(expert_counts) if expert_counts is not None else None,
        )


@torch.no_grad()
def _add_expert_counts(
    counts: list[torch.Tensor] | None,
    task_id: int,
    expert_indices: tuple[torch.Tensor, ...],
    router_probs: tuple[torch.Tensor, ...],
    num_tasks: int,
) -> list[torch.Tensor]:
    """Adds one batch's top-k selections to the per-router `(num_tasks, num_experts)` counts."""
    if counts is None:
        counts = [torch.zeros(num_tasks, p.shape[-1], device=p.device) for p in router_probs]
    for count, indices in zip(counts, expert_indices):
        count[task_id] += torch.bincount(indices.reshape(-1), minlength=count.shape[1]).to(count.dtype)
    return counts


__all__ = [
    "MultiTaskStep",
    "MultiTaskStepOutput",
    "RoutingStatistics",
    "TaskLossWeighting",
    "global_loss_scales",
]
