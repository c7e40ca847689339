"""How often each task chooses each expert: counted over a calibration set, or tracked as an EMA while training.

The model's outputs carry one `expert_indices` tensor per router, in block order with the attention router of a block
before its MLP router; [`router_layout`] names them. Usage is what [`prune_for_task`] decides from: an expert a task
never chooses on some data can be cut out of that task's model without changing its outputs on that data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model.configuration_modsquad import ModSquadConfig
from ..model.modeling_modsquad import ModSquadModel


@dataclass(frozen=True)
class RouterSlot:
    """One router of the model: the block it sits in, `"attention"` or `"mlp"`, and its number of experts."""

    block: int
    kind: str
    num_experts: int

    @property
    def name(self) -> str:
        return f"block {self.block} {self.kind}"


def router_layout(config: ModSquadConfig) -> list[RouterSlot]:
    """The routers of a model, in the order of its outputs' `router_probs` / `expert_indices`: block by block, a
    block's attention router (if it has attention experts) before its MLP router (if it has MLP experts)."""
    slots = []
    mlp_counts = dict(zip(config.moe_layer_indices, config.experts_per_layer))
    attention_counts = dict(zip(config.attention_moe_layer_indices, config.attention_experts_per_layer))
    for block in sorted(set(mlp_counts) | set(attention_counts)):
        if block in attention_counts:
            slots.append(RouterSlot(block, "attention", attention_counts[block]))
        if block in mlp_counts:
            slots.append(RouterSlot(block, "mlp", mlp_counts[block]))
    return slots


def router_positions(config: ModSquadConfig) -> dict[str, dict[int, int]]:
    """Per router kind (`"mlp"`, `"attention"`), block index -> position in that kind's per-block config lists
    (`experts_per_layer` / `attention_experts_per_layer`, `pruned_experts` / `pruned_attention_experts`, ...)."""
    return {
        "mlp": {block: i for i, block in enumerate(config.moe_layer_indices)},
        "attention": {block: i for i, block in enumerate(config.attention_moe_layer_indices)},
    }


@dataclass
class RouterUsage:
    """Usage of the experts of one router by one task.

    Attributes:
        slot ([`RouterSlot`]): which router.
        counts (`torch.Tensor` of shape `(num_experts,)`, float64): how many token slots chose each expert (or any
            non-negative weights proportional to it, such as EMA fractions).
    """

    slot: RouterSlot
    counts: torch.Tensor

    @property
    def fractions(self) -> torch.Tensor:
        """`(num_experts,)` share of the task's selections that went to each expert (zeros if none were seen)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else torch.zeros_like(self.counts)


@dataclass
class ExpertUsage:
    """Expert usage of one task, per router of the model.

    Attributes:
        task (`str`): the task name.
        routers (`list[RouterUsage]`): one entry per router, in [`router_layout`] order.
        tokens (`int`): tokens routed (per router) while counting; 0 for usage read from fractions.
        source (`str`): where it comes from, e.g. `"calibration"` or `"ema"` (shown on model cards).
    """

    task: str
    routers: list[RouterUsage]
    tokens: int = 0
    source: str = "calibration"

    @property
    def layout(self) -> list[RouterSlot]:
        return [router.slot for router in self.routers]

    def check_layout(self, config: ModSquadConfig) -> None:
        """Raises a ValueError unless this usage was taken on a model with `config`'s routers."""
        expected = router_layout(config)
        if self.layout != expected:
            raise ValueError(
                f"usage of task {self.task!r} covers routers {[(s.name, s.num_experts) for s in self.layout]}, but "
                f"the model has {[(s.name, s.num_experts) for s in expected]}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form (see [`ExpertUsage.from_dict`])."""
        return {
            "task": self.task,
            "tokens": self.tokens,
            "source": self.source,
            "routers": [
                {"block": r.slot.block, "kind": r.slot.kind, "counts": r.counts.tolist()}
                for r in self.routers
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExpertUsage:
        try:
            routers = [
                RouterUsage(
                    RouterSlot(int(r["block"]), str(r["kind"]), len(r["counts"])),
                    torch.tensor(r["counts"], dtype=torch.float64),
                )
                for r in data["routers"]
            ]
            return cls(str(data["task"]), routers, int(data.get("tokens", 0)), str(data.get("source", "")))
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"not an expert-usage record (expected 'task' and 'routers' with 'block', 'kind', 'counts'): {error}"
            ) from error

    @classmethod
    def from_fractions(
        cls,
        config: ModSquadConfig,
        task: str | int,
        fractions: Sequence[Sequence[float]],
        source: str = "ema",
    ) -> ExpertUsage:
        """Usage from per-router fractions in [`router_layout`] order, e.g. one task's entry of the trainer's
        `expert_usage_ema.json`."""
        name = config.get_task(task)["name"]
        layout = router_layout(config)
        if len(fractions) != len(layout) or any(len(f) != s.num_experts for f, s in zip(fractions, layout)):
            raise ValueError(
                f"task {name!r}: got fractions for {[len(f) for f in fractions]} experts per router; the model's "
                f"routers have {[s.num_experts for s in layout]}"
            )
        routers = [
            RouterUsage(s, torch.tensor(list(f), dtype=torch.float64)) for s, f in zip(layout, fractions)
        ]
        return cls(name, routers, 0, source)


# ------------------------------------------------------------------------------------------------ inputs
def as_pixel_batch(item: Any) -> torch.Tensor:
    """The `(batch, channels, height, width)` pixels of one loader item: a batch dict with `pixel_values`, a tensor
    (one image or a batch), or a `(pixels, ...)` tuple as a `TensorDataset` loader yields."""
    if isinstance(item, Mapping):
        if "pixel_values" not in item:
            raise ValueError(f"a batch dict needs a 'pixel_values' entry, got keys {sorted(item)}")
        pixels = item["pixel_values"]
    elif isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
        pixels = item[0]
    else:
        pixels = item
    if not isinstance(pixels, torch.Tensor) or pixels.ndim not in (3, 4):
        shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(
            f"expected pixel values of shape (channels, height, width) or (batch, channels, height, width), got "
            f"{shape}; accepted items: batch dicts with 'pixel_values', tensors, or (pixels, ...) tuples"
        )
    return pixels.unsqueeze(0) if pixels.ndim == 3 else pixels


def pixel_batches(data: Iterable, config: ModSquadConfig, task: str) -> Iterable[torch.Tensor]:
    """Pixel batches of `task` from a DataLoader or any iterable; batch dicts of another task (a `task` entry naming
    another task, as in mixed multi-task loaders) are skipped."""
    for item in data:
        tagged = isinstance(item, Mapping) and item.get("task") is not None
        if tagged and config.get_task(item["task"])["name"] != task:
            continue
        yield as_pixel_batch(item)


def backbone_of(model: torch.nn.Module) -> ModSquadModel:
    """The [`ModSquadModel`] of a ModSquad model (itself, or the `modsquad` attribute of a head model)."""
    if isinstance(model, ModSquadModel):
        return model
    backbone = getattr(model, "modsquad", None)
    if not isinstance(backbone, ModSquadModel):
        raise ValueError(
            f"expected a ModSquad model (ModSquadModel, ModSquadFor<Type> or ModSquadForMultiTask), got "
            f"{type(model).__name__}"
        )
    return backbone


# ---------------------------------------------------------------------------------------------- counting
def _count_selections(expert_indices: Sequence[torch.Tensor], layout: list[RouterSlot]) -> list[torch.Tensor]:
    if len(expert_indices) != len(layout):
        raise ValueError(
            f"got {len(expert_indices)} expert_indices tensors; the model has {len(layout)} routers"
        )
    counts = [
        torch.bincount(idx.reshape(-1), minlength=s.num_experts) for idx, s in zip(expert_indices, layout)
    ]
    # One host transfer for every router together.
    flat = torch.cat(counts).cpu().to(torch.float64)
    return list(flat.split([s.num_experts for s in layout]))


@torch.inference_mode()
def collect_expert_usage(
    model: torch.nn.Module, dataset_or_loader: Iterable, task: str | int, max_batches: int | None = None
) -> ExpertUsage:
    """Counts, per router, how often `task` routes token slots to each expert on some data.

    Only the backbone runs (heads do not route), in eval mode, so no router noise changes the choices.

    Args:
        model: a [`ModSquadModel`], `ModSquadFor<Type>` or [`ModSquadForMultiTask`].
        dataset_or_loader (`Iterable`): a DataLoader of batch dicts `{"pixel_values": (B, C, H, W), ...}` (dicts of
            other tasks, by their `task` entry, are skipped), or any iterable of pixel tensors `(B, C, H, W)` /
            `(C, H, W)` or `(pixels, ...)` tuples.
        task (`str` or `int`): the task whose routers to follow.
        max_batches (`int`, *optional*): stop after this many batches of the task.

    Returns:
        [`ExpertUsage`] with integer counts per router; `fractions` gives the shares.

    Example:

    ```python
    >>> usage = collect_expert_usage(model, val_loader, task="seg")
    >>> [r.fractions for r in usage.routers]
    ```"""
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    backbone = backbone_of(model)
    config = backbone.config
    name = config.get_task(task)["name"]
    served = getattr(model, "task", None)
    if isinstance(served, str) and served != name:
        raise ValueError(f"this model serves task {served!r}, got task={task!r}")
    layout = router_layout(config)
    if not layout:
        raise ValueError(
            "the model has no MoE blocks (moe_layers is empty): there is no expert usage to collect"
        )
    parameter = next(backbone.parameters())
    totals = [torch.zeros(s.num_experts, dtype=torch.float64) for s in layout]
    tokens = batches = 0
    was_training = backbone.training
    backbone.eval()
    try:
        for pixels in pixel_batches(dataset_or_loader, config, name):
            pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
            output = backbone(pixels, task=name, output_router_logits=True, return_dict=True)
            for total, count in zip(totals, _count_selections(output.expert_indices, layout)):
                total += count
            tokens += output.expert_indices[0].shape[0]
            batches += 1
            if max_batches is not None and batches >= max_batches:
                break
    finally:
        backbone.train(was_training)
    if batches == 0:
        raise ValueError(f"the data yielded no batches of task {name!r}; nothing to count")
    return ExpertUsage(name, [RouterUsage(s, t) for s, t in zip(layout, totals)], tokens, "calibration")


def run_ema_usage(run, config: ModSquadConfig) -> dict[str, ExpertUsage]:
    """The trainer's per-task EMA of expert usage in a run folder ([`RunFolder`]), as [`ExpertUsage`]s (`{}` when the
    run has none)."""
    fractions = run.ema_usage_fractions()
    return {task: ExpertUsage.from_fractions(config, task, values) for task, values in fractions.items()}


# ------------------------------------------------------------------------------------------------ tracker
class ExpertUsageTracker:
    """Exponential moving average (and running count) of each task's expert usage, updated from training outputs.

    `update(task, outputs.expert_indices)` after a task batch's forward (run with `output_router_logits=True`);
    `usage(task)` gives an [`ExpertUsage`] that [`prune_for_task`] accepts. The statistics are local to the process;
    `state_dict()` / `load_state_dict()` let the trainer save them with its checkpoints (e.g.
    `loop_state.register("usage_tracker", tracker)` with a `training.checkpointing.CheckpointedState`: JSON and
    safetensors, never a pickle).

    Args:
        config ([`ModSquadConfig`]): configuration of the model being trained.
        decay (`float`, *optional*, defaults to 0.99): EMA decay per update of a task, in `[0, 1)`.
    """

    def __init__(self, config: ModSquadConfig, decay: float = 0.99):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        self.config = config
        self.decay = float(decay)
        self.layout = router_layout(config)
        if not self.layout:
            raise ValueError(
                "the model has no MoE blocks (moe_layers is empty): there is no expert usage to track"
            )
        self.reset()

    def reset(self) -> None:
        self.ema: dict[str, list[torch.Tensor]] = {}
        self.counts: dict[str, list[torch.Tensor]] = {}
        self.updates: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    def update(self, task: str | int, expert_indices: Sequence[torch.Tensor]) -> None:
        """Adds one batch of `task`. `expert_indices`: the model output's tuple, one `(tokens, top_k)` per router."""
        name = self.config.get_task(task)["name"]
        counts = _count_selections([idx.detach() for idx in expert_indices], self.layout)
        fractions = [c / c.sum().clamp_min(1.0) for c in counts]
        tokens = int(expert_indices[0].shape[0])
        if name not in self.ema:
            # The first batch initialises the average: no bias towards an arbitrary starting value.
            self.ema[name], self.counts[name] = fractions, counts
            self.updates[name], self.tokens[name] = 1, tokens
            return
        self.ema[name] = [self.decay * e + (1.0 - self.decay) * f for e, f in zip(self.ema[name], fractions)]
        self.counts[name] = [total + c for total, c in zip(self.counts[name], counts)]
        self.updates[name] += 1
        self.tokens[name] += tokens

    def usage(self, task: str | int, statistic: str = "ema") -> ExpertUsage:
        """The tracked usage of `task`: `statistic="ema"` (recent behaviour) or `"counts"` (since the start)."""
        name = self.config.get_task(task)["name"]
        if statistic not in ("ema", "counts"):
            raise ValueError(f"statistic={statistic!r}; accepted: 'ema', 'counts'")
        if name not in self.ema:
            raise ValueError(f"no batch of task {name!r} was tracked yet; tracked tasks: {sorted(self.ema)}")
        values = self.ema[name] if statistic == "ema" else self.counts[name]
        routers = [RouterUsage(s, v.clone()) for s, v in zip(self.layout, values)]
        return ExpertUsage(name, routers, self.tokens[name], statistic)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and strings only (safe for `torch.load(weights_only=True)`)."""
        return {
            "decay": self.decay,
            "layout": [[s.block, s.kind, s.num_experts] for s in self.layout],
            "ema": {task: list(values) for task, values in self.ema.items()},
            "counts": {task: list(values) for task, values in self.counts.items()},
            "updates": dict(self.updates),
            "tokens": dict(self.tokens),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        layout = [list(entry) for entry in state.get("layout", [])]
        expected = [[s.block, s.kind, s.num_experts] for s in self.layout]
        if layout != expected:
            raise ValueError(f"the saved tracker follows routers {layout}; this model has {expected}")
        unknown = sorted(set(state["ema"]) - set(self.config.task_names))
        if unknown:
            raise ValueError(
                f"the saved tracker has tasks {unknown} that this model lacks ({self.config.task_names})"
            )
        self.decay = float(state["decay"])
        self.ema = {
            task: [v.to(torch.float64).cpu() for v in values] for task, values in state["ema"].items()
        }
        self.counts = {
            task: [v.to(torch.float64).cpu() for v in values] for task, values in state["counts"].items()
        }
        self.updates = {task: int(n) for task, n in state["updates"].items()}
        self.tokens = {task: int(n) for task, n in state["tokens"].items()}


__all__ = [
    "ExpertUsage",
    "ExpertUsageTracker",
    "RouterSlot",
    "RouterUsage",
    "as_pixel_batch",
    "backbone_of",
    "collect_expert_usage",
    "pixel_batches",
    "router_layout",
    "run_ema_usage",
]
