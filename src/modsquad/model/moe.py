"""Mixture-of-experts pieces: per-task routers, MLP experts, attention experts, auxiliary losses.

The experts keep their weights as 3-D parameters (`[num_experts, out, in]`) and go through Transformers' experts
dispatch (`use_experts_implementation`), so `experts_implementation="eager" | "grouped_mm" | "batched_mm" | ...`
picks the kernel as for Mixtral or Qwen-MoE; `"auto"` (the default: `"sorted_mm"` on CPU, `"grouped_mm"` on GPUs) and
`"sorted_mm"` are registered by this package (see `sorted_mm.py`).

This file is also shipped as remote code next to checkpoints: it imports only torch, transformers and siblings.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .sorted_mm import ExpertDispatch, attention_experts_kernel, expert_linear


# ------------------------------------------------------------------------------------------------- routers
class RouterOutput(NamedTuple):
    """What one router decided for a batch of tokens. A tuple, so that the backbone's output recorders pick its fields
    by position (`router_logits` 0, `router_probs` 1, `expert_indices` 2), as for Qwen3-MoE's routers.

    Attributes:
        logits: `(tokens, num_experts)` clean router logits (z-loss, statistics).
        probs: `(tokens, num_experts)` softmax of the clean logits.
        top_k_index: `(tokens, top_k)` chosen experts.
        top_k_weights: `(tokens, top_k)` mixing weights of the chosen experts (not recorded in model outputs, so
            `None` in the routings rebuilt from them; the auxiliary losses do not read it).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor | None


class ModSquadTaskRouter(nn.Module):
    """One linear router per task, stored as a `[num_tasks, num_experts, hidden]` parameter.

    Initialised small and random (`config.router_init_std`), so tokens spread over experts from the first step; at
    zero every token would pick the same top-k experts until gradients or noise (training only) break the tie.

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
    """Mixture of attention experts (Mod-Squad / MoA): each expert owns a query and an output projection of
    `attention_expert_heads` heads of `head_dim`, every expert shares one key and one value projection of as many
    heads; each token attends through its top-k experts. With one head per expert (the default) this is the
    reference's shape: every token's k expert queries attend over a single shared key/value head.

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
        self.head_dim = config.head_dim
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

    def forward(
        self, hidden_states: torch.Tensor, task_id: int, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention output `(batch, seq, hidden)` and its probabilities `(batch, attention_expert_heads * top_k, seq,
        seq)` (kv-head-major: the `top_k` expert queries of each key/value head in routing order): computed by eager
        attention when `output_attentions`, else by the configured kernel (`None` from those that do not form them,
        such as sdpa)."""
        batch, seq, hidden = hidden_states.shape
        heads, head_dim, k = self.num_heads, self.head_dim, self.top_k
        flat = hidden_states.reshape(-1, hidden)
        routing = self.router(flat, task_id)
        dispatch = ExpertDispatch.from_indices(routing.top_k_index, self.num_experts)
        # The configured experts implementation picks the GEMM kernel: `sorted_mm` on CPU, `grouped_mm` on GPUs.
        kernel = attention_experts_kernel(self.config._experts_implementation, flat.device.type)

        q_sorted = expert_linear(
            flat.index_select(0, dispatch.token_of_slot), self.q_proj, self.q_proj_bias, dispatch, kernel
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
        attention_fn = (
            self._eager_attention_fn
            if output_attentions
            else ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, self._eager_attention_fn
            )
        )
        attn, weights = attention_fn(
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
        y = expert_linear(
            attn.index_select(0, dispatch.order), self.o_proj, self.o_proj_bias, dispatch, kernel
        )
        y = y * routing.top_k_weights.reshape(-1).index_select(0, dispatch.order).unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, dispatch.token_of_slot, y.to(flat.dtype))
        return out.view(batch, seq, hidden), weights


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


__all__ = [
    "ModSquadAttentionExperts",
    "ModSquadExperts",
    "ModSquadSparseMLP",
    "ModSquadTaskRouter",
    "RouterOutput",
    "load_balancing_loss",
    "router_z_loss",
    "task_expert_mutual_information",
]
