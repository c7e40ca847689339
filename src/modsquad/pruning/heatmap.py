"""Expert-usage heat-maps, drawn on matplotlib's Agg canvas directly (no pyplot: no global backend state, safe in
threads and headless runs).

Two cuts of the same numbers: [`plot_expert_usage`] draws one router's tasks x experts (the demo's per-layer maps),
[`plot_router_usage`] every router of one or more tasks (routers x experts, one panel per task, the experts a pruned
model kept outlined; what the model cards show).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .usage import ExpertUsage


def _figure(width: float, height: float, dpi: int):
    """A figure on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def plot_expert_usage(
    usage: np.ndarray | Sequence[Sequence[float]],
    task_names: Sequence[str],
    path: str | Path,
    title: str = "expert usage",
) -> Path:
    """Draws one MoE router's task-by-expert usage as an annotated heat-map and saves it as PNG.

    Args:
        usage (`np.ndarray` of shape `(num_tasks, num_experts)`): fraction of each task's token slots routed to each
            expert (rows sum to 1).
        task_names (`Sequence[str]`): row labels.
        path (`str` or `Path`): output PNG file (parent folders are created).
        title (`str`, *optional*): figure title, e.g. the layer name.

    Returns:
        `Path`: the written file.
    """
    usage = np.asarray(usage, dtype=np.float64)
    if usage.ndim != 2 or usage.shape[0] != len(task_names):
        raise ValueError(
            f"usage must be (num_tasks={len(task_names)}, num_experts), got shape {tuple(usage.shape)}"
        )
    num_tasks, num_experts = usage.shape
    figure = _figure(1.0 + 0.55 * num_experts, 1.2 + 0.5 * num_tasks, dpi=120)
    axes = figure.subplots()
    image = axes.imshow(usage, cmap="viridis", vmin=0.0, vmax=max(float(usage.max()), 1e-9), aspect="auto")
    axes.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
    axes.set_yticks(range(num_tasks), list(task_names))
    axes.set_xlabel("expert")
    axes.set_title(title)
    # Numbers on the cells: the heat-map is read for which experts a task keeps, not only for its colours.
    if num_experts <= 32:
        threshold = usage.max() / 2
        for t in range(num_tasks):
            for e in range(num_experts):
                colour = "black" if usage[t, e] > threshold else "white"
                axes.text(e, t, f"{usage[t, e]:.2f}", ha="center", va="center", fontsize=6, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.04, pad=0.02, label="fraction of task's tokens")
    return _save(figure, path)


def usage_data_text(usage: ExpertUsage, description: str | None = None) -> str:
    """What a usage was computed on, for a heat-map title: `description` when the caller knows it (e.g. `"the
    validation split"`), else what the usage records (`"calibration data (12,544 tokens)"`, `"the training EMA"`)."""
    if description:
        return description
    if usage.source == "ema":
        return "the training EMA"
    if usage.source == "calibration":
        return f"calibration data ({usage.tokens:,} tokens)" if usage.tokens else "calibration data"
    return usage.source or "unrecorded data"


def usage_matrix(usage: ExpertUsage) -> np.ndarray:
    """`(routers, max_experts)` fractions; NaN where a router has fewer experts than the widest one."""
    width = max(r.slot.num_experts for r in usage.routers)
    matrix = np.full((len(usage.routers), width), np.nan)
    for row, router in enumerate(usage.routers):
        matrix[row, : router.slot.num_experts] = router.fractions.numpy()
    return matrix


def plot_router_usage(
    usages: ExpertUsage | Sequence[ExpertUsage],
    path: str | Path,
    kept: Sequence[Sequence[int] | None] | None = None,
    title: str | None = None,
) -> Path:
    """Saves a PNG heat-map of the share of each task's selections that each expert receives, per router.

    Args:
        usages ([`ExpertUsage`] or a sequence of them): one panel per task, side by side.
        path (`str` or `Path`): where to write the PNG.
        kept (`Sequence[Sequence[int]]`, *optional*): per router, the experts a pruned model kept (one task
            only); they are outlined, the dropped ones crossed out.
        title (`str`, *optional*): figure title.

    Returns:
        `Path` of the PNG.
    """
    from matplotlib.patches import Rectangle

    usages = [usages] if isinstance(usages, ExpertUsage) else list(usages)
    if not usages:
        raise ValueError("usages is empty: give at least one ExpertUsage to plot")
    if kept is not None and (len(usages) != 1 or len(kept) != len(usages[0].routers)):
        raise ValueError(
            f"kept needs a single task's usage and one list per router ({len(usages[0].routers)}), "
            f"got {len(usages)} usages and {len(kept)} lists"
        )
    matrices = [usage_matrix(u) for u in usages]
    rows, width = matrices[0].shape
    figure = _figure(1.2 + 0.35 * width * len(usages) + 1.0, 1.2 + 0.3 * rows, dpi=100)
    axes = figure.subplots(1, len(usages), squeeze=False)[0]
    vmax = max(float(np.nanmax(m)) if not np.all(np.isnan(m)) else 0.0 for m in matrices) or 1.0
    image = None
    for axis, usage, matrix in zip(axes, usages, matrices):
        image = axis.imshow(
            matrix, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest"
        )
        axis.set_title(usage.task)
        axis.set_xlabel("expert")
        axis.set_xticks(range(matrix.shape[1]))
        axis.set_yticks(range(rows))
        axis.set_yticklabels([r.slot.name for r in usage.routers] if axis is axes[0] else [])
        axis.tick_params(labelsize=7)
    if kept is not None:
        axis = axes[0]
        for row, experts in enumerate(kept):
            if experts is None:  # a router that was not pruned
                continue
            for expert in range(usages[0].routers[row].slot.num_experts):
                if expert in experts:
                    axis.add_patch(
                        Rectangle(
                            (expert - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.5
                        )
                    )
                else:
                    axis.plot([expert], [row], marker="x", color="red", markersize=6)
    figure.colorbar(image, ax=list(axes), label="share of selections", shrink=0.9)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


__all__ = ["plot_expert_usage", "plot_router_usage", "usage_data_text", "usage_matrix"]
