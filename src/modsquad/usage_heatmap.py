"""Heat-map of expert usage by router (routers x experts, one panel per task), drawn with matplotlib's Agg canvas.

`modsquad.plotting.plot_expert_usage` draws one router's tasks x experts; the cards need the other cut: every router
of one task at once, with the experts a pruned model kept outlined.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .expert_usage import ExpertUsage


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
    # The Agg canvas directly, not pyplot: no global backend state, safe in threads and headless runs.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
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
    figure = Figure(
        figsize=(1.2 + 0.35 * width * len(usages) + 1.0, 1.2 + 0.3 * rows), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(figure)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


__all__ = ["plot_router_usage", "usage_matrix"]
