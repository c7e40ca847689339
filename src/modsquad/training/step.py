"""One multi-task training step as a single module forward: the task micro-batches it is given, the weighted task
losses, the per-batch auxiliary router losses and the task-expert mutual-information loss.

The mutual-information loss needs the routing statistics of several tasks (with a single task it is identically
zero). Two estimators provide them:

- the exact per-step one ([`RoutingStatistics`]): the joint `P(task, expert)` of the micro-batches of one forward.
  Its gradient is exact only when the whole step is one graph with one backward, so every task micro-batch of the
  step must go through one forward of this module (under DistributedDataParallel several forwards before one
  backward break the gradient reducer; wrapping the whole step in one `forward`, the module `accelerator.prepare`
  wraps, makes the step one DDP forward);
- the streaming one ([`StreamingRoutingStatistics`]): a running estimate over recent steps, which each micro-batch
  differentiates through its own share. A single-task step then gets its signal, and each task micro-batch may
  run its own forward and backward (one task graph at a time: the activation memory of the largest task batch,
  not of all of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class StreamingRoutingStatistics:
    r"""
    A running estimate of the task-expert joint `P(task, expert)` of every router, spanning steps, and the
    mutual-information loss of the current micro-batches against it.

    **Estimate.** For one router, let an *observation* of task `t` be one micro-batch of that task, summed over every
    process: `n` tokens with router distributions `p_i` (softmax of the clean logits), of mean
    `m_t = (1/n) sum_i p_i` (a distribution over the `E` experts). The estimate of task `t`'s routing is a
    discounted mean of its observations, of horizon `H` (`beta = 1 - 1/H`):

        A_t <- beta * A_t + m_t,    N_t <- beta * N_t + 1,    q_t = A_t / N_t
        (q_t = sum_k beta^(K-k) m_t^(k) / sum_k beta^(K-k) over the task's observations k = 1..K)

    that is the plain mean of its observations while there are fewer than about `H`, then an exponential moving
    average of horizon `H`. Only observations of `t` move `q_t`: a task that recent steps did not draw keeps its last
    estimate instead of fading away, so rare tasks stay in the joint. Over the set `S` of tasks observed so far, each
    of weight `pi_t = 1/|S|` (tasks count alike, however often a sampler draws them and whatever their batch size):

        P(t, e) = pi_t q_t(e),    P(e) = sum_t pi_t q_t(e),
        I(T;E) = sum_t pi_t sum_e q_t(e) log(q_t(e) / P(e)),    dI/dq_t(e) = pi_t (log q_t(e) - log P(e)) (+ const).

    **Gradient.** Right after an observation has updated the estimate, its own mean carries the gradient of the loss
    `-I(T;E)` with respect to its task's distribution, through a surrogate of value 0:

        surrogate = -(1 / r_t) sum_routers sum_e G(e) (m_t(e) - sg[m_t(e)]),    G = dI/dq_t at the updated estimate,

    `sg` stopping gradients, `r_t` the task's rate (below). So a batch of task `t` gets the gradient that task
    `t`'s routing contributes to `I(T;E)` given what the other tasks did recently; it is the per-step loss's
    gradient with the step's joint replaced by the window's (it does not shrink with `H`: the derivative of the
    window's `I` with respect to one observation is `(1 - beta) G`, one observation's weight in the window, and the
    surrogate divides that weight out, so `mi_loss_coef` means what it means for the per-step loss).

    **Rates.** A sampler draws task `t` on average `r_t` times per step (`tasks_per_step * p_t`; 1 for every task
    under SIMT). The exact gradient of the window's `I(T;E)` moves every task's routing alike, whatever its share of
    the window (each row of the joint weighs `pi_t`); dividing each observation's surrogate by `r_t` gives, summed
    over the window, that gradient (times the window's length in steps) in expectation, so rarely drawn tasks
    specialise at the pace of frequent ones instead of `r_t` times slower.

    Observations are taken one after the other in micro-batch order, whether a step runs as one graph or one task
    graph at a time, so both give the same gradients. Differences from the per-step estimator: tasks weigh `1/|S|`
    rather than by their tokens in the step, and statistics of earlier steps enter as constants.

    **Processes.** Every process feeds the same observations (the same tasks in the same order; the sums of every
    process, see [`all_reduce_observations`]), so every process holds the same estimate; each differentiates only
    its own tokens, so [`MultiTaskStep`] scales the surrogate by the number of processes against DDP's averaging.

    The state is plain tensors and numbers ([`state_dict`]); saved with the training state, it makes resuming exact.

    Args:
        num_tasks (`int`): number of tasks of the model.
        horizon (`float`, *optional*, defaults to 10.0): observations of a task its estimate averages over
            (`beta = 1 - 1/horizon`); 1 keeps only the latest observation of each task.
        task_rates (`list[float]`, *optional*): `r_t`, the micro-batches of each task per step on average (for a
            [`MultiTaskMixer`]: `tasks_per_step * probabilities`); defaults to 1 for every task (SIMT).

    Example:

    ```python
    >>> stats = StreamingRoutingStatistics(num_tasks=3, horizon=20)
    >>> surrogate = stats.observe(task_id, mean_router_probs)  # per router: (num_experts,), with grad
    >>> (config.mi_loss_coef * surrogate).backward()
    >>> stats.mutual_information()  # I(T;E) of the estimate, summed over routers, in nats
    ```"""

    def __init__(self, num_tasks: int, horizon: float = 10.0, task_rates: list[float] | None = None):
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or not horizon >= 1:
            raise ValueError(f"horizon must be a number >= 1 (observations per task), got {horizon!r}")
        task_rates = [1.0] * num_tasks if task_rates is None else [float(rate) for rate in task_rates]
        if len(task_rates) != num_tasks or not all(rate > 0 for rate in task_rates):
            raise ValueError(f"task_rates must hold one number > 0 per task ({num_tasks}), got {task_rates}")
        self.num_tasks = num_tasks
        self.horizon = float(horizon)
        self.task_rates = task_rates
        self.sums: list[torch.Tensor] | None = None  # per router: (num_tasks, num_experts), the A_t
        self.weights = torch.zeros(num_tasks, dtype=torch.float64)  # the N_t

    @property
    def beta(self) -> float:
        return 1.0 - 1.0 / self.horizon

    @property
    def seen(self) -> torch.Tensor:
        """`(num_tasks,)` booleans: which tasks have been observed."""
        return self.weights > 0

    @property
    def tasks_seen(self) -> list[int]:
        return [t for t in range(self.num_tasks) if self.weights[t] > 0]

    @property
    def estimates(self) -> list[torch.Tensor] | None:
        """Per router, the `(num_tasks, num_experts)` estimates `q_t` (rows of unseen tasks: 0)."""
        if self.sums is None:
            return None
        weights = self.weights.clamp_min(1e-30).to(self.sums[0].device, torch.float32).unsqueeze(1)
        return [total / weights * self.seen.to(total.device).unsqueeze(1) for total in self.sums]

    def observe(self, task_id: int, means: list[torch.Tensor]) -> torch.Tensor:
        """Averages one observation of `task_id` into the estimate and returns its surrogate loss.

        Args:
            task_id (`int`): the observation's task.
            means (`list[torch.Tensor]`): per router, the `(num_experts,)` mean router distribution of the
                observation's tokens over every process, with gradient to this process's tokens.

        Returns:
            `torch.Tensor`: scalar of value 0 whose gradient with respect to `means` is that of `-I(T;E)` divided by
            the task's rate (see the class docstring); no gradient (a zero constant) while fewer than two tasks have
            been observed.
        """
        if not 0 <= task_id < self.num_tasks:
            raise ValueError(f"task_id={task_id} is out of range for {self.num_tasks} tasks")
        if not means:
            raise ValueError("means is empty: the model has no MoE blocks to take statistics from")
        if self.sums is None:
            self.sums = [torch.zeros(self.num_tasks, m.shape[-1], device=m.device) for m in means]
        if len(means) != len(self.sums):
            raise ValueError(f"got {len(means)} routers, expected {len(self.sums)} as before")
        self.sums = [total.to(means[0].device) for total in self.sums]
        for total, mean in zip(self.sums, means):
            total[task_id] = self.beta * total[task_id] + mean.detach().float()
        self.weights[task_id] = self.beta * self.weights[task_id] + 1.0
        surrogate = torch.zeros((), device=means[0].device)
        if len(self.tasks_seen) < 2:
            return surrogate
        for estimate, mean in zip(self.estimates, means):
            gradient = self._mutual_information_gradient(estimate, task_id)
            mean = mean.float()
            surrogate = surrogate - (gradient * (mean - mean.detach())).sum()
        return surrogate / self.task_rates[task_id]

    def _mutual_information_gradient(self, estimate: torch.Tensor, task_id: int) -> torch.Tensor:
        """`dI/dq_t` of one router's joint `pi_t q_t` over the tasks seen, at the current estimate."""
        seen = self.seen.to(estimate.device)
        with torch.enable_grad():
            q = estimate.detach().clone().requires_grad_(True)
            joint = q * seen.unsqueeze(1) / seen.sum()
            (gradient,) = torch.autograd.grad(task_expert_mutual_information(joint), q)
        return gradient[task_id]

    def joint(self) -> list[torch.Tensor]:
        """Per router, the estimated `(num_tasks, num_experts)` joint `P(task, expert)` (rows of unseen tasks: 0)."""
        if self.sums is None:
            raise RuntimeError("StreamingRoutingStatistics are empty: observe() some task batches first")
        seen = self.seen.to(self.sums[0].device)
        return [estimate * seen.unsqueeze(1) / seen.sum() for estimate in self.estimates]

    def mutual_information_per_router(self) -> list[float]:
        """`I(T;E)` of the estimate of each router, in nats."""
        if self.sums is None:
            return []
        return [float(task_expert_mutual_information(joint)) for joint in self.joint()]

    def mutual_information(self) -> torch.Tensor:
        """`sum over routers of I(T;E)` of the estimate, in nats (0 before two tasks have been observed)."""
        if self.sums is None:
            return torch.zeros(())
        return torch.stack([task_expert_mutual_information(joint) for joint in self.joint()]).sum()

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain numbers only: `horizon`, `weights` `(num_tasks,)` (the `N_t`) and, per router `i`, the
        `(num_tasks, num_experts)` discounted sums `A_t` under `sums_<i>`."""
        state: dict[str, Any] = {"horizon": self.horizon, "weights": self.weights.clone()}
        for index, total in enumerate(self.sums or []):
            state[f"sums_{index}"] = total.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = torch.as_tensor(state["weights"], dtype=torch.float64)
        if weights.shape != (self.num_tasks,):
            raise ValueError(
                f"the saved routing statistics cover {weights.numel()} tasks, this model has {self.num_tasks}"
            )
        if float(state["horizon"]) != self.horizon:
            raise ValueError(
                f"the saved routing statistics were kept with horizon {state['horizon']}, this run uses "
                f"{self.horizon}; resuming would not reproduce the run"
            )
        keys = sorted((k for k in state if k.startswith("sums_")), key=lambda k: int(k.split("_")[1]))
        device = self.sums[0].device if self.sums else torch.device("cpu")
        self.sums = [torch.as_tensor(state[k], dtype=torch.float32).to(device).clone() for k in keys] or None
        self.weights = weights.clone()


def all_reduce_observations(
    masses: list[list[torch.Tensor]], tokens: list[float]
) -> tuple[list[list[torch.Tensor]], list[float]]:
    """Sums the router statistics of several micro-batches over every process, in one collective.

    Args:
        masses (`list[list[torch.Tensor]]`): per micro-batch, per router, the `(num_experts,)` sum of this process's
            router distributions (with gradient).
        tokens (`list[float]`): per micro-batch, this process's tokens.

    Returns:
        The same, summed over processes; the other processes' share enters as a constant, so each process keeps the
        gradient path to its own tokens. Without an initialised process group (or with one process): unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return masses, tokens
    local = [m for batch in masses for m in batch]
    flat = torch.cat([m.detach().float().reshape(-1) for m in local])
    counts = torch.tensor(tokens, dtype=flat.dtype, device=flat.device)
    total = torch.cat([flat, counts])
    dist.all_reduce(total)
    reduced, offset = [], 0
    for batch in masses:
        summed = []
        for mass in batch:
            size = mass.numel()
            other = total[offset : offset + size].view_as(mass) - mass.detach().float()
            summed.append(mass.float() + other)
            offset += size
        reduced.append(summed)
    return reduced, total[offset:].tolist()


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
            the forward (the same micro-batch layout on every process: the mixer draws the same tasks everywhere).
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
        loss (`torch.FloatTensor`): what to back-propagate: weighted task losses + auxiliary losses + the
            mutual-information term at `mi_loss_coef * world_size` (scaled so that DDP's gradient averaging yields the
            gradient of the global mutual information). With the streaming estimator the MI term is a surrogate of
            value 0 (see [`StreamingRoutingStatistics`]).
        weighted_loss (`torch.FloatTensor`): detached weighted task losses + auxiliary losses: the step's loss
            without its mutual-information term (what to log next to `mi_loss_coef * mi_loss`).
        task_losses (`torch.FloatTensor` of shape `(num_tasks,)`): detached sum of each task's losses (task loss
            without the auxiliary loss) over its micro-batches of this forward; under several processes each is this
            process's share of the global batch's loss (see [`global_loss_scales`]), so their mean over processes is
            the global loss.
        task_counts (`torch.FloatTensor` of shape `(num_tasks,)`): micro-batches of each task in this forward.
        aux_loss (`torch.FloatTensor`): detached sum of the per-batch auxiliary router losses.
        mi_loss (`torch.FloatTensor`): detached `-I(T;E)`, summed over routers, over every process: of this forward's
            micro-batches with the per-step estimator (0 with fewer than two tasks), of the running estimate after
            this forward with the streaming one.
        expert_counts (`tuple(torch.FloatTensor)`): per router, `(num_tasks, num_experts)` top-k selections of this
            process in this forward.
    """

    loss: torch.FloatTensor | None = None
    weighted_loss: torch.FloatTensor | None = None
    task_losses: torch.FloatTensor | None = None
    task_counts: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    mi_loss: torch.FloatTensor | None = None
    expert_counts: tuple[torch.FloatTensor, ...] | None = None


def merge_step_outputs(outputs: list[MultiTaskStepOutput]) -> MultiTaskStepOutput:
    """One output for several forwards of one step (one task graph at a time): sums of the losses, counts and
    selections; `mi_loss` of the last forward (the estimate after the whole step). `loss` is left out: each forward's
    loss was back-propagated on its own."""
    counts = [out.expert_counts for out in outputs if out.expert_counts is not None]
    return MultiTaskStepOutput(
        weighted_loss=torch.stack([out.weighted_loss for out in outputs]).sum(),
        task_losses=torch.stack([out.task_losses for out in outputs]).sum(dim=0),
        task_counts=torch.stack([out.task_counts for out in outputs]).sum(dim=0),
        aux_loss=torch.stack([out.aux_loss for out in outputs]).sum(),
        mi_loss=outputs[-1].mi_loss,
        expert_counts=tuple(torch.stack(per_router).sum(dim=0) for per_router in zip(*counts))
        if counts
        else None,
    )


class MultiTaskStep(nn.Module):
    r"""
    Runs task micro-batches through a [`ModSquadForMultiTask`] and returns their total loss: all the micro-batches of
    a step in one forward, or (with the streaming estimator) one task micro-batch per forward.

    Mutual information, per step: the routing statistics of the forward's batches are accumulated in a
    [`RoutingStatistics`], all-reduced across processes, and the loss is taken once over them, so it sees every task
    of the forward. Streaming (`routing_estimate` given): each micro-batch, in order, is averaged into the running
    estimate and differentiates the MI of the estimate through its own share (see [`StreamingRoutingStatistics`]).

    Args:
        model ([`ModSquadForMultiTask`]): the model (its parameters are this module's `model.*`).
        weighting ([`TaskLossWeighting`], *optional*): task loss weights; fixed unit weights by default.
        world_size (`int`, *optional*, defaults to 1): number of data-parallel processes. DDP averages gradients,
            while each process's mutual-information loss already covers the global statistics; multiplying it by
            `world_size` makes the averaged gradient that of the global loss.
        routing_estimate ([`StreamingRoutingStatistics`], *optional*): use the streaming estimator, kept in this
            object across steps (save and restore it with the training state); the per-step estimator otherwise.

    Example:

    ```python
    >>> step = MultiTaskStep(ModSquadForMultiTask(config))
    >>> out = step([("cls", {"pixel_values": x1, "labels": y1}), ("seg", {"pixel_values": x2, "labels": y2})])
    >>> out.loss.backward()
    ```"""

    def __init__(
        self,
        model: ModSquadForMultiTask,
        weighting: TaskLossWeighting | None = None,
        world_size: int = 1,
        routing_estimate: StreamingRoutingStatistics | None = None,
    ):
        super().__init__()
        self.model = model
        self.weighting = weighting if weighting is not None else TaskLossWeighting(model.config.task_names)
        if self.weighting.task_names != model.config.task_names:
            raise ValueError(
                f"loss weighting tasks {self.weighting.task_names} differ from the model's {model.config.task_names}"
            )
        if routing_estimate is not None and routing_estimate.num_tasks != model.config.num_tasks:
            raise ValueError(
                f"routing_estimate covers {routing_estimate.num_tasks} tasks, the model has {model.config.num_tasks}"
            )
        self.world_size = world_size
        # A plain attribute, not a buffer: DDP must not broadcast it, and every process updates it identically.
        self.routing_estimate = routing_estimate

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
        observations: list[tuple[int, list[torch.Tensor], float]] = []
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
                if self.routing_estimate is None:
                    stats.update(task_id, out.router_probs)
                else:
                    masses = [p.float().sum(dim=0) for p in out.router_probs]
                    observations.append((task_id, masses, float(out.router_probs[0].shape[0])))
                expert_counts = _add_expert_counts(
                    expert_counts, task_id, out.expert_indices, out.router_probs, num_tasks
                )
        weighted_loss = total.detach()

        mi_loss = torch.zeros((), device=device)
        if self.routing_estimate is not None and observations:
            mi_term = self._streaming_mi_term(observations)
            mi_loss = -self.routing_estimate.mutual_information().to(device)
            if config.mi_loss_coef > 0:
                total = total + config.mi_loss_coef * self.world_size * mi_term
        elif config.mi_loss_coef > 0 and expert_counts is not None:
            stats.all_reduce()
            # With one task in the whole step the mutual information is identically zero: skip the dead graph.
            if len(stats.tasks_seen) >= 2:
                mi_loss = stats.mutual_information_loss()
                total = total + config.mi_loss_coef * self.world_size * mi_loss
        return MultiTaskStepOutput(
            loss=total,
            weighted_loss=weighted_loss,
            task_losses=task_losses,
            task_counts=task_counts,
            aux_loss=aux_total,
            mi_loss=mi_loss.detach(),
            expert_counts=tuple(expert_counts) if expert_counts is not None else None,
        )

    def _streaming_mi_term(self, observations: list[tuple[int, list[torch.Tensor], float]]) -> torch.Tensor:
        """Sums the micro-batches' statistics over processes (one collective), then averages them into the running
        estimate one after the other; returns the sum of their surrogates."""
        masses, tokens = all_reduce_observations(
            [mass for _, mass, _ in observations], [n for *_, n in observations]
        )
        term = torch.zeros((), device=masses[0][0].device)
        for (task_id, _, _), mass, count in zip(observations, masses, tokens):
            term = term + self.routing_estimate.observe(task_id, [m / count for m in mass])
        return term


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
    "StreamingRoutingStatistics",
    "TaskLossWeighting",
    "all_reduce_observations",
    "global_loss_scales",
    "merge_step_outputs",
]
