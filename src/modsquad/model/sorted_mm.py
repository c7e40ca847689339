"""The experts kernels this package registers in Transformers' `ExpertsInterface`: `"sorted_mm"` and `"auto"` (the
default of ModSquad models).

`"sorted_mm"` sorts the token slots by expert once; each projection is one GEMM per expert over exactly its rows (no
padding, so an expert's result never depends on the others), and a hand-written backward writes every expert's
weight gradient straight into one buffer (autograd through `weight[e]` would materialise a full
`[num_experts, out, in]` gradient per expert, which is what makes the stock eager backward slow on CPU). It loops over
experts in Python after one host sync per layer (`counts.tolist()`): the fastest exact kernel on a CPU. Under
`torch.compile` and `torch.export` the same loop runs inside one opaque custom op per projection
(`torch.ops.modsquad.sorted_grouped_linear`), so the traced graph holds no data-dependent Python ints.

`"auto"` picks by the device of each call: `"sorted_mm"` on CPU; on CUDA and other accelerators the same sorted
rows with each projection one grouped GEMM (`torch.nn.functional.grouped_mm` through Transformers' dispatcher, in
the autocast dtype under autocast): no per-expert Python loop, no host sync. Attention experts follow the same
choice. Transformers keeps its kernels in files of their own (`integrations/moe.py`); so does this package.

Shipped as remote code next to checkpoints: imports only torch and transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from torch.nn import functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

try:  # Transformers' grouped GEMM dispatcher: torch's kernel where it runs, an opaque per-group loop elsewhere
    from transformers.integrations.moe import _grouped_mm
except ImportError:  # a private name: should a release drop it, call torch's kernel directly

    def _grouped_mm(input: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.grouped_mm(input.to(weight.dtype), weight, offs=offs)


SORTED_MM = "sorted_mm"
GROUPED_MM = "grouped_mm"
# The default experts implementation of ModSquad models: the kernel is chosen per call by the device (see
# `resolve_experts_implementation`), as SDPA picks its backend.
AUTO = "auto"


def resolve_experts_implementation(implementation: str | None, device_type: str) -> str | None:
    """The experts kernel that `implementation` runs on a device of type `device_type`.

    Args:
        implementation (`str`, *optional*): a configured experts implementation (`config._experts_implementation`).
        device_type (`str`): `torch.device.type` of the tokens: `"cpu"`, `"cuda"`, `"xpu"`, ...

    Returns:
        `"sorted_mm"` or `"grouped_mm"` for `"auto"` (CPU or not); any other implementation unchanged.
    """
    if implementation != AUTO:
        return implementation
    return SORTED_MM if device_type == "cpu" else GROUPED_MM


def attention_experts_kernel(implementation: str | None, device_type: str) -> str:
    """The grouped-GEMM kernel of attention experts, whose query and output projections are not an MLP: one
    `grouped_mm` when the configured implementation resolves to `"grouped_mm"`, the sorted per-expert GEMMs
    otherwise (also for `"eager"` and `"batched_mm"`, which exist for MLP experts only)."""
    return (
        GROUPED_MM if resolve_experts_implementation(implementation, device_type) == GROUPED_MM else SORTED_MM
    )


@dataclass
class ExpertDispatch:
    """Token-expert slots of one routing decision, grouped by expert.

    Slots are the `(token, k)` pairs of `top_k_index` in row-major order. The experts read them as rows sorted by
    expert (stably, so each expert sees its tokens in token order), back to back without padding: expert `e` owns
    rows `[sum(counts[:e]), sum(counts[:e + 1]))` and gets one GEMM of exactly its rows. An expert's result depends
    only on its own rows, never on how many experts the layer has or how the others are loaded, which is what keeps
    a grown model's old tasks bit-identical (`continual.add_task`).

    Every field is a tensor of a size known before routing, so the dispatch traces under `torch.compile` and
    `torch.export`; `count_list` is the one host sync of the eager CPU kernel.

    Attributes:
        order: `(slots,)` slot positions sorted by expert (stable); row `r` serves slot `order[r]`.
        token_of_slot: `(slots,)` the token each row reads (`order // top_k`).
        counts: `(num_experts,)` rows per expert.
        row_of_slot: `(slots,)` the row of each slot, in slot order (the inverse permutation of `order`).
        expert_of_slot: `(slots,)` the expert of each slot (`top_k_index` flattened).
    """

    order: torch.Tensor
    token_of_slot: torch.Tensor
    counts: torch.Tensor
    row_of_slot: torch.Tensor
    expert_of_slot: torch.Tensor

    @property
    def num_rows(self) -> int:
        """Grouped rows: one per slot."""
        return self.order.shape[0]

    @cached_property
    def count_list(self) -> list[int]:
        """`counts` as Python ints: the one host sync of a layer under the eager sorted kernel."""
        return self.counts.tolist()

    @property
    def expert_of_row(self) -> torch.Tensor:
        """`(slots,)` the expert of each row (non-decreasing)."""
        return self.expert_of_slot.index_select(0, self.order)

    @property
    def offsets(self) -> torch.Tensor:
        """`(num_experts,)` int32 end row of every expert, as `grouped_mm` reads them."""
        return torch.cumsum(self.counts, dim=0, dtype=torch.int32)

    @classmethod
    def from_indices(cls, top_k_index: torch.Tensor, num_experts: int) -> ExpertDispatch:
        """Sorts the slots of `top_k_index` by expert.

        Args:
            top_k_index (`torch.LongTensor` of shape `(tokens, top_k)`): chosen experts.
            num_experts (`int`): number of experts.
        """
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        # scatter_add rather than bincount: its output size is known without reading the indices.
        counts = flat.new_zeros(num_experts).scatter_add_(0, flat, torch.ones_like(flat))
        token_of_slot = order // top_k_index.shape[-1]
        rows = torch.arange(flat.shape[0], device=flat.device)
        row_of_slot = torch.empty_like(order).index_copy_(0, order, rows)
        return cls(order, token_of_slot, counts, row_of_slot, flat)


def _expert_segments(counts: list[int]) -> list[tuple[int, int, int]]:
    """`(expert, first row, end row)` of every expert with rows."""
    segments, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            segments.append((expert, start, start + count))
        start += count
    return segments


def _sorted_linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: list[int]
) -> torch.Tensor:
    """One GEMM per expert with rows, each writing its slice of the output in place."""
    out = x.new_empty(x.shape[0], weight.shape[1])
    for expert, start, end in _expert_segments(counts):
        if bias is None:
            torch.mm(x[start:end], weight[expert].t(), out=out[start:end])
        else:
            torch.addmm(bias[expert], x[start:end], weight[expert].t(), out=out[start:end])
    return out


def _sorted_linear_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    counts: list[int],
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Input, weight and bias gradients of [`_sorted_linear_forward`], each only when needed."""
    grad_out = grad_out.contiguous()
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = weight.new_empty(weight.shape[:2]) if need_b else None
    # Experts with rows get their gradient written whole by their GEMM; only the others need zeros.
    for expert, count in enumerate(counts):
        if count == 0:
            for grad in (grad_w, grad_b):
                if grad is not None:
                    grad[expert].zero_()
    for expert, start, end in _expert_segments(counts):
        g = grad_out[start:end]
        if need_x:
            torch.mm(g, weight[expert], out=grad_x[start:end])
        if need_w:
            torch.mm(g.t(), x[start:end], out=grad_w[expert])
        if need_b:
            torch.sum(g, dim=0, out=grad_b[expert])
    return grad_x, grad_w, grad_b


class _SortedGroupedLinear(torch.autograd.Function):
    """`y[rows of e] = x[rows of e] @ weight[e].T + bias[e]` for rows grouped by expert (see `ExpertDispatch`).

    One GEMM per expert with rows, each writing its slice of the output in place. The backward writes every
    expert's weight gradient straight into one `(num_experts, out, in)` buffer; autograd through `weight[e]`
    would materialise a full zero-filled gradient per expert, which is what makes the stock eager backward slow.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts: list[int]):
        out = _sorted_linear_forward(x, weight, bias, counts)
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.has_bias = counts, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _sorted_linear_backward(
            grad_out, x, weight, ctx.counts, need_x, need_w, need_b and ctx.has_bias
        )
        return *grads, None


# The same loop as one opaque operator for `torch.compile` and `torch.export`: the graph sees a `(rows, out)` result
# of a `(rows, in)` input and never the per-expert row counts, which are data (GuardOnDataDependentSymNode otherwise).
# A checkpoint's remote-code copy of this file may be imported next to the package's: the first registration serves.
_OP_NAMESPACE = "modsquad"


def _traced_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, counts: torch.Tensor):
    return _sorted_linear_forward(x, weight, bias, counts.tolist())


def _traced_linear_fake(x, weight, bias, counts):
    return x.new_empty(x.shape[0], weight.shape[1])


def _traced_linear_backward_op(grad_out, x, weight, counts, need_x: bool, need_w: bool, need_b: bool):
    grad_x, grad_w, grad_b = _sorted_linear_backward(
        grad_out, x, weight, counts.tolist(), need_x, need_w, need_b
    )
    # An operator returns tensors: an empty one stands for a gradient nobody asked for.
    empty = x.new_empty(0)
    return (
        grad_x if grad_x is not None else empty,
        grad_w if grad_w is not None else empty,
        grad_b if grad_b is not None else empty,
    )


def _traced_linear_backward_fake(grad_out, x, weight, counts, need_x, need_w, need_b):
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(weight) if need_w else x.new_empty(0),
        weight.new_empty(weight.shape[:2]) if need_b else x.new_empty(0),
    )


def _traced_linear_setup_context(ctx, inputs, output):
    x, weight, bias, counts = inputs
    ctx.save_for_backward(x, weight, counts)
    ctx.has_bias = bias is not None


def _traced_linear_autograd(ctx, grad_out):
    x, weight, counts = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    grad_x, grad_w, grad_b = getattr(torch.ops, _OP_NAMESPACE).sorted_grouped_linear_backward(
        grad_out, x, weight, counts, need_x, need_w, need_b
    )
    return grad_x if need_x else None, grad_w if need_w else None, grad_b if need_b else None, None


def _register_traced_linear() -> None:
    if hasattr(getattr(torch.ops, _OP_NAMESPACE), "sorted_grouped_linear"):
        return
    torch.library.custom_op(
        f"{_OP_NAMESPACE}::sorted_grouped_linear",
        _traced_linear,
        mutates_args=(),
        schema="(Tensor x, Tensor weight, Tensor? bias, Tensor counts) -> Tensor",
    )
    torch.library.register_fake(f"{_OP_NAMESPACE}::sorted_grouped_linear", _traced_linear_fake)
    torch.library.custom_op(
        f"{_OP_NAMESPACE}::sorted_grouped_linear_backward",
        _traced_linear_backward_op,
        mutates_args=(),
        schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor counts, bool need_x, bool need_w, bool need_b) "
        "-> (Tensor, Tensor, Tensor)",
    )
    torch.library.register_fake(
        f"{_OP_NAMESPACE}::sorted_grouped_linear_backward", _traced_linear_backward_fake
    )
    torch.library.register_autograd(
        f"{_OP_NAMESPACE}::sorted_grouped_linear",
        _traced_linear_autograd,
        setup_context=_traced_linear_setup_context,
    )


_register_traced_linear()


def sorted_grouped_linear(
    x_sorted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: torch.Tensor | list[int],
) -> torch.Tensor:
    """Per-expert linear map of rows grouped by expert: one GEMM per expert over exactly its rows.

    Eagerly a Python loop after one host sync; under `torch.compile` / `torch.export` the same loop inside one
    opaque operator (`torch.ops.modsquad.sorted_grouped_linear`), so the graph has no data-dependent sizes.

    Args:
        x_sorted (`torch.Tensor` of shape `(rows, in)`): rows sorted by expert, `counts[e]` rows of expert `e`.
        weight (`torch.Tensor` of shape `(num_experts, out, in)`): expert weights.
        bias (`torch.Tensor` of shape `(num_experts, out)`, *optional*): expert biases.
        counts (`torch.Tensor` of shape `(num_experts,)` or `list[int]`): rows of each expert.

    Returns:
        `torch.Tensor` of shape `(rows, out)`.
    """
    x_sorted = x_sorted.to(weight.dtype)
    if torch.compiler.is_compiling():
        if not isinstance(counts, torch.Tensor):
            counts = torch.tensor(counts, device=x_sorted.device)
        return getattr(torch.ops, _OP_NAMESPACE).sorted_grouped_linear(x_sorted, weight, bias, counts)
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    return _SortedGroupedLinear.apply(x_sorted, weight, bias, counts)


def grouped_mm_linear(
    x_sorted: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dispatch: ExpertDispatch
) -> torch.Tensor:
    """The same map as [`sorted_grouped_linear`] as one grouped GEMM (`torch.nn.functional.grouped_mm`, through
    Transformers' dispatcher): no per-expert Python loop and no host sync.

    Under autocast the rows and the weights are cast to the autocast dtype first, as `F.linear` does: the grouped
    kernel takes no mixed inputs and runs natively in bf16 only (CUDA SM80+); other dtypes and devices get torch's
    (or Transformers') per-group fallback, which reads the offsets on the host.

    Args:
        x_sorted (`torch.Tensor` of shape `(rows, in)`): rows sorted by expert.
        weight (`torch.Tensor` of shape `(num_experts, out, in)`): expert weights.
        bias (`torch.Tensor` of shape `(num_experts, out)`, *optional*): expert biases.
        dispatch ([`ExpertDispatch`]): the routing the rows were sorted by.

    Returns:
        `torch.Tensor` of shape `(rows, out)`.
    """
    device_type = x_sorted.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    out = _grouped_mm(x_sorted.to(dtype), weight.to(dtype).transpose(-2, -1), offs=dispatch.offsets)
    if bias is not None:
        out = out + bias.index_select(0, dispatch.expert_of_row).to(out.dtype)
    return out


def expert_linear(
    x_sorted: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dispatch: ExpertDispatch,
    kernel: str = SORTED_MM,
) -> torch.Tensor:
    """Per-expert linear map of rows sorted by `dispatch`, by `kernel` (`"sorted_mm"` or `"grouped_mm"`, see
    [`attention_experts_kernel`])."""
    if kernel == GROUPED_MM:
        return grouped_mm_linear(x_sorted, weight, bias, dispatch)
    if kernel != SORTED_MM:
        raise ValueError(f"kernel={kernel!r}; accepted: {[SORTED_MM, GROUPED_MM]}")
    counts = dispatch.counts if torch.compiler.is_compiling() else dispatch.count_list
    return sorted_grouped_linear(x_sorted, weight, bias, counts)


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


def _experts_by_rows(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    dispatch: ExpertDispatch,
    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
) -> torch.Tensor:
    """The experts' maths on rows sorted by expert, in plain differentiable operations around `linear` (the grouped
    GEMM of a kernel): gather every slot's token, up projection, activation, down projection, routing-weighted
    sum of each token's slots. What `torch.compile` and `torch.export` trace, and the GPU kernel."""
    up_bias = self.up_proj_bias if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    x = hidden_states.index_select(0, dispatch.token_of_slot)
    y = linear(self.act_fn(linear(x, self.up_proj, up_bias)), self.down_proj, down_bias)
    slots = y.index_select(0, dispatch.row_of_slot).view(*top_k_weights.shape, y.shape[-1])
    return torch.bmm(top_k_weights.to(y.dtype).unsqueeze(1), slots).squeeze(1).to(hidden_states.dtype)


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward registered as `experts_implementation="sorted_mm"` (GELU experts, no gate).

    Gathers every token's rows in expert order, runs both projections as one GEMM per expert over exactly its
    rows, and sums each token's expert outputs by routing weight. Outputs and gradients (input, expert weights and
    biases, routing weights) are the eager loop's up to float rounding.
    """
    dispatch = ExpertDispatch.from_indices(top_k_index, self.num_experts)
    if torch.compiler.is_compiling():
        # The eager gather/combine functions below keep Python objects on their autograd context: trace plain ops.
        def linear(x, weight, bias):
            return sorted_grouped_linear(x, weight, bias, dispatch.counts)

        return _experts_by_rows(self, hidden_states, top_k_weights, dispatch, linear)
    counts = dispatch.count_list
    bias = self.has_bias
    x = _GatherRows.apply(hidden_states, dispatch)
    h = self.act_fn(sorted_grouped_linear(x, self.up_proj, self.up_proj_bias if bias else None, counts))
    y = sorted_grouped_linear(h, self.down_proj, self.down_proj_bias if bias else None, counts)
    return _CombineRows.apply(y, top_k_weights, dispatch).to(hidden_states.dtype)


def _sorted_mm_fits(module: nn.Module) -> bool:
    """Whether `module` is an experts layout `sorted_mm` computes: un-gated, `(E, out, in)` weights, one process."""
    return not (
        getattr(module, "has_gate", True)
        or getattr(module, "is_transposed", False)
        or getattr(module, "has_post_expert_norm", False)
        or getattr(module, "_is_expert_parallel", False)
    )


def sorted_grouped_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The GPU kernel of `"auto"`: the rows of `sorted_mm`, each projection one grouped GEMM ([`grouped_mm_linear`],
    autocast-aware), no per-expert Python loop and no host sync. Differs from Transformers' `"grouped_mm"` in
    running bf16 under autocast (Transformers' casts the rows to the fp32 weights, which sends the GEMM to the
    per-group fallback)."""
    dispatch = ExpertDispatch.from_indices(top_k_index, self.num_experts)

    def linear(x, weight, bias):
        return grouped_mm_linear(x, weight, bias, dispatch)

    return _experts_by_rows(self, hidden_states, top_k_weights, dispatch, linear)


def auto_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts forward registered as `experts_implementation="auto"`: by the device of the tokens,
    [`sorted_mm_experts_forward`] on CPU, [`sorted_grouped_mm_experts_forward`] elsewhere. Experts layouts these kernels
    do not compute (gated, transposed, expert-parallel: other models' experts) go to Transformers' `"grouped_mm"`."""
    if not _sorted_mm_fits(self):
        return ALL_EXPERTS_FUNCTIONS[GROUPED_MM](self, hidden_states, top_k_index, top_k_weights)
    if resolve_experts_implementation(AUTO, hidden_states.device.type) == SORTED_MM:
        return sorted_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return sorted_grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(SORTED_MM, sorted_mm_experts_forward)
ExpertsInterface.register(AUTO, auto_experts_forward)


__all__ = [
    "AUTO",
    "GROUPED_MM",
    "SORTED_MM",
    "ExpertDispatch",
    "attention_experts_kernel",
    "auto_experts_forward",
    "expert_linear",
    "grouped_mm_linear",
    "resolve_experts_implementation",
    "sorted_grouped_linear",
    "sorted_grouped_mm_experts_forward",
    "sorted_mm_experts_forward",
]
