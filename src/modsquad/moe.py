"""Mixture-of-experts pieces: per-task routers, MLP experts, attention experts, auxiliary losses.

The experts keep their weights as 3-D parameters (`[num_experts, out, in]`) and go through Transformers' experts
dispatch (`use_experts_implementation`), so `experts_implementation="eager" | "grouped_mm" | "batched_mm" | ...`
picks the kernel as for Mixtral or Qwen-MoE. This module also registers `"sorted_mm"`, the default: tokens are sorted
by expert once, each projection is one GEMM per expert over exactly its rows (no padding, so an expert's result
never depends on the others), and a hand-written backward writes every expert's weight gradient straight into one
buffer (autograd through `weight[e]` would materialise a full `[num_experts, out, in]` gradient per expert, which is
what makes the stock eager backward slow on CPU).

This file is also shipped as remote code next to checkpoints: it imports only torch, transformers and siblings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.integrations.moe import ExpertsInterface, use_experts_implementation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

SORTED_MM = "sorted_mm"


# --------------------------------------------------------------------------------------------- grouped kernel
@dataclass
class ExpertDispatch:
    """Token-expert slots of one routing decision, grouped by expert.

    Slots are the `(token, k)` pairs of `top_k_index` in row-major order. The experts read them as rows sorted by
    expert (stably, so each expert sees its tokens in token order), back to back without padding: expert `e` owns
    rows `[sum(counts[:e]), sum(counts[:e + 1]))` and gets one GEMM of exactly its rows. An expert's result depends
    only on its own rows, never on how many experts the layer has or how the others are loaded, which is what keeps
    a grown model's old tasks bit-identical (`continual.add_task`).

    Attributes:
        order: `(slots,)` slot positions sorted by expert (stable); row `r` serves slot `order[r]`.
        token_of_slot: `(slots,)` the token each row reads (`order // top_k`).
        counts: rows per expert.
        row_of_slot: `(slots,)` the row of each slot, in slot order (the inverse permutation of `order`).
    """

    order: torch.Tensor
    token_of_slot: torch.Tensor
    counts: list[int]
    row_of_slot: torch.Tensor

    @property
    def num_rows(self) -> int:
        """Grouped rows: one per slot."""
        return self.order.shape[0]

    @classmethod
    def from_indices(cls, top_k_index: torch.Tensor, num_experts: int) -> ExpertDispatch:
        """Sorts the slots of `top_k_index` by expert.

        Args:
            top_k_index (`torch.LongTensor` of shape `(tokens, top_k)`): chosen experts.
            num_experts (`int`): number of experts.
        """
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync of a layer
        token_of_slot = order // top_k_index.shape[-1]
        rows = torch.arange(flat.shape[0], device=flat.device)
        row_of_slot = torch.empty_like(order).index_copy_(0, order, rows)
        return cls(order, token_of_slot, counts, row_of_slot)


def _expert_segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """`(expert, first row, end row)` of every expert with rows."""
    segments, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            segments.append((expert, start, start + count))
        start += count
    return segments


class _SortedGroupedLinear(torch.autograd.Function):
    """`y[rows of e] = x[rows of e] @ weight[e].T + bias[e]` for rows grouped by expert (see `ExpertDispatch`).

    One GEMM per expert with rows, each writing its slice of the output in place. The backward writes every
    expert's weight gradient straight into one `(num_experts, out, in)` buffer; autograd through `weight[e]`
    would materialise a full zero-filled gradient per expert, which is what makes the stock eager backward slow.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts: list[int]):
        x = x.to(weight.dtype)
        out = x.new_empty(x.shape[0], weight.shape[1])
        for expert, start, end in _expert_segments(counts):
            if bias is None:
                torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
            else:
                torch.addmm(bias[expert], x[start:end], weight[expert].t(), out=out[start:end])
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.has_bias = counts, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and ctx.has_bias
        grad_out = grad_out.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = weight.new_empty(weight.shape[:2]) if need_b else None
        # Experts with rows get their gradient written whole by their GEMM; only the others need zeros.
        for expert, count in enumerate(ctx.counts):
            if count == 0:
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[expert].zero_()
        for expert, start, end in _expert_segments(ctx.counts):
            g = grad_out[start:end]
            if need_x:
                torch.mm(g, weight[expert], out=grad_x[start:end])
            if need_w:
                torch.mm(g.t(), x[start:end], out=grad_w[expert])
            if need_b:
                torch.sum(g, dim=0, out=grad_b[expert])
        return grad_x, grad_w, grad_b, None


def sorted_grouped_linear(
    x_sorted: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: list[int]
) -> torch.Tensor:
    """Per-expert linear map of rows grouped by expert.

    Args:
        x_sorted (`torch.Tensor` of shape `(rows, in)`): rows sorted by expert, `counts[e]` rows of expert `e`.
        weight (`torch.Tensor` of shape `(num_experts, out, in)`): expert weights.
        bias (`torch.Tensor` of shape `(num_experts, out)`, *optional*): expert biases.
        counts (`list[int]`): rows of each expert.

    Returns:
        `torch.Tensor` of shape `(rows, out)`.
    """
    return _SortedGroupedLinear.apply(x_sorted, weight, bias, counts)


class _GatherRows(torch.autograd.Function):
    """`hidden[token_of_slot]`: the grouped rows the experts read.

    The backward sums the `top_k` rows of each token with one `embedding_bag` (gather and sum in one pass).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, dispatch: ExpertDispatch) -> torch.Tensor:
        ctx.dispatch = dispatch
        ctx.num_tokens = hidden.shape[0]
        return hidden.index_select(0, dispatch.token_of_slot)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        slots_of_token = ctx.dispatch.row_of_slot.view(ctx.num_tokens, -1)
        return F.embedding_bag(slots_of_token, grad_rows, mode="sum"), None


class _CombineRows(torch.autograd.Function):
    """`out[t] = sum_k weights[t, k] * rows[row_of_slot[t, k]]`: each token's routing-weighted sum of its expert
    outputs, as one `embedding_bag` with per-sample weights.

    The backward gives row `r` the gradient `weight_r * grad_out[token_r]` and each routing weight
    `grad_out[t] . rows[row_of_slot[t, k]]`.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, dispatch: ExpertDispatch) -> torch.Tensor:
        weights = weights.to(rows.dtype)
        slots_of_token = dispatch.row_of_slot.view(weights.shape)
        ctx.save_for_backward(rows, weights)
        ctx.dispatch = dispatch
        return F.embedding_bag(slots_of_token, rows, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, weights = ctx.saved_tensors
        dispatch = ctx.dispatch
        grad_out = grad_out.contiguous()
        grad_rows = grad_weights = None
        if ctx.needs_input_grad[0]:
            weight_of_row = weights.reshape(-1).index_select(0, dispatch.order)
            grad_rows = F.embedding_bag(
                dispatch.token_of_slot.unsqueeze(-1),
                grad_out,
                per_sample_weights=weight_of_row.unsqueeze(-1),
                mode="sum",
            )
        if ctx.needs_input_grad[1]:
            slots = rows.index_select(0, dispatch.row_of_slot).view(*weights.shape, rows.shape[-1])
            grad_weights = torch.bmm(slots, grad_out.unsqueeze(-1)).squeeze(-1)
        return grad_rows, grad_weights, None


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward registered as `experts_implementation="sorted_mm"` (GELU experts with biases, no gate).

    Gathers every token's rows in expert order, runs both projections as one GEMM per expert over exactly its
    rows, and sums each token's expert outputs by routing weight. Outputs and gradients (input, expert weights and
    biases, routing weights) are the eager loop's up to float rounding.
    """
    dispatch = ExpertDispatch.from_indices(top_k_index, self.num_experts)
    x = _GatherRows.apply(hidden_states, dispatch)
    h = self.act_fn(sorted_grouped_linear(x, self.up_proj, self.up_proj_bias, dispatch.counts))
    y = sorted_grouped_linear(h, self.down_proj, self.down_proj_bias, dispatch.counts)
    return _CombineRows.apply(y, top_k_weights, dispatch).to(hidden_states.dtype)


ExpertsInterface.register(SORTED_MM, sorted_mm_experts_forward)


# ------------------------------------------------------------------------------------------------- routers
@dataclass
class RouterOutput:
    """What one router decided for a batch of tokens.

    Attributes:
        logits: `(tokens, num_experts)` clean router logits (z-loss, statistics).
        probs: `(tokens, num_experts)` softmax of the clean logits.
        top_k_index: `(tokens, top_k)` chosen experts.
        top_k_weights: `(tokens, top_k)` mixing weights of the chosen experts.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor


class ModSquadTaskRouter(nn.Module):
    """One zero-initialised linear router per task, stored as a `[num_tasks, num_experts, hidden]` parameter.

    Zero init makes every task start from uniform routing; noise (training only) breaks the ties.

    Args:
        config ([`ModSquadConfig`]): model configuration.
        num_experts (`int`): experts of this block.
        top_k (`int`): experts chosen per token.
        task_expert_limits (`list[int]`, *optional*): per task, how many of the leading experts it may route to
            (the task entry's `routable_experts`); defaults to all of them. Experts added for a later task
            (continual learning) stay invisible to the tasks trained before them, so their outputs never change.
    """

    def __init__(self, config, num_experts: int, top_k: int, task_expert_limits: list[int] | None = None):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter_noise = config.router_jitter_noise
        self.noise_std = config.router_noise_std
        self.task_expert_limits = list(task_expert_limits or [num_experts] * config.num_tasks)
        self.weight = nn.Parameter(torch.zeros(config.num_tasks, num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, task_id: int) -> RouterOutput:
        if self.training and self.jitter_noise > 0:
            jitter = torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise
            )
            hidden_states = hidden_states * jitter
        limit = self.task_expert_limits[task_id]
        logits = F.linear(hidden_states, self.weight[task_id, :limit])
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        selection = logits
        if self.training and self.noise_std > 0:
            selection = logits + torch.randn_like(logits) * self.noise_std
        top_k_index = torch.topk(selection, self.top_k, dim=-1).indices
        top_k_weights = probs.gather(-1, top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if limit < self.num_experts:
            # Softmax and top-k above ran over the routable experts only, so this task computes exactly what it did
            # before experts were added; the padding keeps every task's statistics the same width.
            logits = F.pad(logits, (0, self.num_experts - limit), value=float("-inf"))
            probs = F.pad(probs, (0, self.num_experts - limit))
        return RouterOutput(logits, probs, top_k_index, top_k_weights.to(hidden_states.dtype))


# ------------------------------------------------------------------------------------------------- experts
@use_experts_implementation(has_gate=False, has_bias=True)
class ModSquadExperts(nn.Module):
    """GELU MLP experts: `up_proj (E, I, H)`, `up_proj_bias (E, I)`, `down_proj (E, H, I)`, `down_proj_bias (E, H)`.

    The `forward` below is the eager reference; the configured experts implementation replaces it.
    """

    def __init__(self, config, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        hidden, inner = config.hidden_size, config.expert_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(num_experts, inner, hidden))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, inner))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            h = F.linear(hidden_states[token_idx], self.up_proj[expert], self.up_proj_bias[expert])
            h = F.linear(self.act_fn(h), self.down_proj[expert], self.down_proj_bias[expert])
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final


class ModSquadSparseMLP(nn.Module):
    """Mixture-of-experts MLP: a per-task router picks `num_experts_per_tok` GELU experts per token."""

    def __init__(self, config, num_experts: int, task_expert_limits: list[int] | None = None):
        super().__init__()
        self.router = ModSquadTaskRouter(config, num_experts, config.num_experts_per_tok, task_expert_limits)
        self.experts = ModSquadExperts(config, num_experts)

    def forward(self, hidden_states: torch.Tensor, task_id: int) -> tuple[torch.Tensor, RouterOutput]:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        routing = self.router(flat, task_id)
        out = self.experts(flat, routing.top_k_index, routing.top_k_weights)
        return out.reshape(shape), routing


class ModSquadAttentionExperts(nn.Module):
    """Mixture of attention experts (Mod-Squad / MoA): each expert owns a query and an output projection, every
    expert shares one key and one value projection; each token attends through its top-k experts.

    The queries of the k chosen experts of a token become k query heads per key/value head (as in grouped-query
    attention), so the attention itself goes through Transformers' attention interface unchanged.
    """

    def __init__(
        self, config, num_experts: int, eager_attention_fn, task_expert_limits: list[int] | None = None
    ):
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.top_k = config.attention_experts_per_tok
        self.num_heads = config.attention_expert_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.dropout = config.attention_probs_dropout_prob
        # The k expert queries of a token share its key/value heads, read by the attention functions as GQA groups.
        self.num_key_value_groups = self.top_k
        self._eager_attention_fn = eager_attention_fn
        inner = self.num_heads * self.head_dim
        self.router = ModSquadTaskRouter(config, num_experts, self.top_k, task_expert_limits)
        self.k_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, inner, bias=config.qkv_bias)
        self.q_proj = nn.Parameter(torch.empty(num_experts, inner, config.hidden_size))
        self.q_proj_bias = nn.Parameter(torch.empty(num_experts, inner))
        self.o_proj = nn.Parameter(torch.empty(num_experts, config.hidden_size, inner))
        self.o_proj_bias = nn.Parameter(torch.empty(num_experts, config.hidden_size))

    def forward(self, hidden_states: torch.Tensor, task_id: int) -> tuple[torch.Tensor, RouterOutput]:
        batch, seq, hidden = hidden_states.shape
        heads, head_dim, k = self.num_heads, self.head_dim, self.top_k
        flat = hidden_states.reshape(-1, hidden)
        routing = self.router(flat, task_id)
        dispatch = ExpertDispatch.from_indices(routing.top_k_index, self.num_experts)

        q_sorted = sorted_grouped_linear(
            flat.index_select(0, dispatch.token_of_slot), self.q_proj, self.q_proj_bias, dispatch.counts
        )
        q = torch.empty_like(q_sorted).index_copy_(0, dispatch.order, q_sorted)  # back to (token, slot) order
        # (B, S, k, heads, d) -> (B, heads * k, S, d): kv-head-major so that each key/value head serves k queries
        q = (
            q.view(batch, seq, k, heads, head_dim)
            .permute(0, 3, 2, 1, 4)
            .reshape(batch, heads * k, seq, head_dim)
        )
        key = self.k_proj(hidden_states).view(batch, seq, heads, head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, seq, heads, head_dim).transpose(1, 2)
        attention_fn = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._eager_attention_fn
        )
        attn, _ = attention_fn(
            self,
            q,
            key,
            value,
            None,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        # attn: (B, S, heads * k, d) -> per slot (B * S * k, heads * d), then into expert order
        attn = (
            attn.reshape(batch, seq, heads, k, head_dim).permute(0, 1, 3, 2, 4).reshape(-1, heads * head_dim)
        )
        y = sorted_grouped_linear(
            attn.index_select(0, dispatch.order), self.o_proj, self.o_proj_bias, dispatch.counts
        )
        y = y * routing.top_k_weights.reshape(-1).index_select(0, dispatch.order).unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, dispatch.token_of_slot, y.to(flat.dtype))
        return out.view(batch, seq, hidden), routing


# --------------------------------------------------------------------------------------- auxiliary losses
def load_balancing_loss(routings: list[RouterOutput]) -> torch.Tensor:
    """Switch-Transformer load balance, averaged over routers: `E * sum_e f_e * P_e` (1 when perfectly balanced).

    `f_e` is the fraction of token slots sent to expert `e`, `P_e` the mean router probability of `e`.
    """
    losses = []
    for routing in routings:
        num_experts = routing.probs.shape[-1]
        slots = F.one_hot(routing.top_k_index, num_experts).sum(dim=1).float()
        fraction = slots.mean(dim=0) / routing.top_k_index.shape[-1]
        losses.append(num_experts * torch.sum(fraction * routing.probs.mean(dim=0)))
    return torch.stack(losses).mean()


def router_z_loss(routings: list[RouterOutput]) -> torch.Tensor:
    """ST-MoE router z-loss, averaged over routers: mean squared log-sum-exp of the router logits."""
    return torch.stack([torch.logsumexp(r.logits.float(), dim=-1).square().mean() for r in routings]).mean()


def task_expert_mutual_information(joint: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mutual information `I(T;E) = H(E) - H(E|T)` of a joint task-expert distribution.

    Args:
        joint (`torch.Tensor` of shape `(num_tasks, num_experts)`): non-negative mass (probabilities or summed
            router probabilities); normalised here. Tasks with no mass do not contribute.

    Returns:
        Scalar tensor, in nats: 0 when every task routes alike, `log(num_tasks)` for equally weighted tasks on
        disjoint experts.
    """
    joint = joint.float()
    joint = joint / joint.sum().clamp_min(eps)
    p_task = joint.sum(dim=1, keepdim=True)
    p_expert = joint.sum(dim=0, keepdim=True)
    entropy_expert = -(p_expert * torch.log(p_expert.clamp_min(eps))).sum()
    p_expert_given_task = joint / p_task.clamp_min(eps)
    entropy_expert_given_task = -(joint * torch.log(p_expert_given_task.clamp_min(eps))).sum()
    return entropy_expert - entropy_expert_given_task


class RoutingStatistics:
    """Accumulates the joint task-expert router probabilities over the task batches of one optimizer step.

    The mutual-information loss is a function of this joint distribution, so it is only meaningful once several
    tasks have been seen: with a single task it is identically zero. The training loop calls `reset()` at the start
    of each step, `update(task_id, outputs.router_probs)` after each task batch's forward, `all_reduce()` when
    several processes train together, then adds `config.mi_loss_coef * stats.mutual_information_loss()` to the
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


__all__ = [
    "SORTED_MM",
    "ModSquadAttentionExperts",
    "ModSquadExperts",
    "ModSquadSparseMLP",
    "ModSquadTaskRouter",
    "RouterOutput",
    "RoutingStatistics",
    "load_balancing_loss",
    "router_z_loss",
    "sorted_grouped_linear",
    "task_expert_mutual_information",
]
