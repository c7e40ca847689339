"""Task-by-expert usage heat-maps (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def plot_expert_usage(
    usage: np.ndarray | Sequence[Sequence[float]],
    task_names: Sequence[str],
    path: str | Path,
    title: str = "expert usage",
) -> Path:
    """Draws one MoE layer's task-by-expert usage as an annotated heat-map and saves it as PNG.

    Args:
        usage (`np.ndarray` of shape `(num_tasks, num_experts)`): fraction of each task's token slots routed to each
            expert (rows sum to 1).
        task_names (`Sequence[str]`): row labels.
        path (`str` or `Path`): output PNG file (parent folders are created).
        title (`str`, *optional*): figure title, e.g. the layer name.

    Returns:
        `Path`: the written file.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    usage = np.asarray(usage, dtype=np.float64)
    if usage.ndim != 2 or usage.shape[0] != len(task_names):
        raise ValueError(
            f"usage must be (num_tasks={len(task_names)}, num_experts), got shape {tuple(usage.shape)}"
        )
    num_tasks, num_experts = usage.shape
    figure, axes = plt.subplots(figsize=(1.0 + 0.55 * num_experts, 1.2 + 0.5 * num_tasks), dpi=120)
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
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


__all__ = ["plot_expert_usage"]
