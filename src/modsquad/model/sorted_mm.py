"""The `"sorted_mm"` experts kernel, registered in Transformers' `ExpertsInterface` (the default of ModSquad models).

Tokens are sorted by expert once; each projection is one GEMM per expert over exactly its rows (no padding, so an
expert's result never depends on the others), and a hand-written backward writes every expert's weight gradient
straight into one buffer (autograd through `weight[e]` would materialise a full `[num_experts, out, in]` gradient per
expert, which is what makes the stock eager backward slow on CPU). Transformers keeps its kernels in files of their
own (`integrations/moe.py`); so does this package.

Shipped as remote code next to checkpoints: imports only torch and transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.moe import ExpertsInterface

SORTED_MM = "sorted_mm"


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


__all__ = ["SORTED_MM", "ExpertDispatch", "sorted_grouped_linear", "sorted_mm_experts_forward"]
