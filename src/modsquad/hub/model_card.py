"""Model cards for Mod-Squad checkpoints: the multi-task model and each pruned per-task model.

Cards are the Jinja templates of `templates/` rendered by `huggingface_hub.ModelCard.from_template`, with metadata
the Hub understands (`library_name`, `pipeline_tag`, `tags`, `datasets`, `base_model`, `license`, `model-index`).
Everything a card shows is read from the model folder and its run folder (config, safetensors headers,
`expert_usage.json` / `.png`, `pruning.json`, metrics, recipe), so the same card can be rendered again with Hub repo
ids at publishing time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..metrics.evaluation import summary_metrics
from ..model.configuration_modsquad import ModSquadConfig
from ..model.modeling_heads import task_head_class
from ..run_folder import (
    PRUNING_FILE,
    USAGE_FILE,
    USAGE_PLOT,
    RunFolder,
    count_parameters,
    weights_bytes,
)

TEMPLATES = Path(__file__).parent / "templates"
MULTITASK_TEMPLATE = TEMPLATES / "multitask.md.jinja"
PRUNED_TEMPLATE = TEMPLATES / "pruned_task.md.jinja"
CITATION_FILE = TEMPLATES / "citation.bib"
CARD_FILE = "README.md"
DEFAULT_LICENSE = "apache-2.0"
BASE_TAGS = ["modsquad", "mixture-of-experts", "vision-transformer", "vision"]
# An image of the task's own data, saved next to the weights by `prune_run`; the Hub's inference widget shows it.
EXAMPLE_IMAGE = "example.jpg"
# How a model relates to its `base_model`, as the Hub defines it: one of "adapter", "merge", "quantized",
# "finetune". A model upcycled from a dense checkpoint and trained from its weights is a fine-tune of it. A pruned
# task model is none of the four (its weights are a subset of its parent's, not trained, merged, adapted or
# quantized), so its card names its parent as `base_model` and states no relation.
UPCYCLED_RELATION = "finetune"
# What a Hub repo id looks like: `name` or `namespace/name`.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
MAX_LABELS_SHOWN = 12


# --------------------------------------------------------------------------------------------- formatting
def human_count(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def human_bytes(value: int | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("kB", 1 << 10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def hub_id(value: str | None, base: Path | None = None) -> str | None:
    """`value` if it reads as a Hub repo id and is not a local path (relative to the cwd or `base`), else None."""
    if not value or not _HUB_ID.match(value) or value == "demo":
        return None
    if Path(value).exists() or (base is not None and (base / value).exists()):
        return None
    return value


def _labels_text(task: Mapping[str, Any]) -> str:
    labels = [task["id2label"][i] for i in sorted(task["id2label"])] if "id2label" in task else []
    if not labels:
        return "n/a (regression)"
    shown = ", ".join(f"`{label}`" for label in labels[:MAX_LABELS_SHOWN])
    return shown if len(labels) <= MAX_LABELS_SHOWN else f"{shown}, ... ({len(labels)} in total)"


def _task_view(task: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": task["name"],
        "type": task["type"],
        "labels_text": _labels_text(task),
        "pipeline_tag": task_head_class(task["type"]).pipeline_tag,
        "auto_class": task_head_class(task["type"]).auto_class,
    }


def _counts_text(counts: list[int]) -> str:
    return str(counts[0]) if len(set(counts)) == 1 else "/".join(map(str, counts)) + " (per block)"


def _architecture(config: ModSquadConfig) -> dict[str, Any]:
    attention = config.attention_experts_per_layer
    return {
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "heads": config.num_attention_heads,
        "patch_size": config.patch_size,
        "image_size": "x".join(map(str, config.image_size_hw)),
        "moe_blocks": ", ".join(
            map(str, sorted({*config.moe_layer_indices, *config.attention_moe_layer_indices}))
        ),
        "experts_text": _counts_text(config.experts_per_layer),
        "expert_width": config.expert_intermediate_size,
        "top_k": config.num_experts_per_tok,
        "attention_experts_text": _counts_text(attention) if attention else None,
        "attention_top_k": config.attention_experts_per_tok,
    }


def _local_name(folder: Path) -> str:
    """How a loading snippet names a local folder: relative to the working directory when below it."""
    relative = os.path.relpath(folder.resolve())
    return str(folder.resolve()) if relative.startswith("..") else relative


def _citation() -> str:
    return CITATION_FILE.read_text(encoding="utf-8").strip()


def _usage_source(record: Mapping[str, Any]) -> str:
    """Where an expert-usage record (one task's entry of `expert_usage.json`, see `ExpertUsage.to_dict`) came from."""
    source = record.get("source")
    if source == "calibration":
        return f"counted over {record.get('tokens', 0)} tokens of calibration data"
    return "exponential moving average during training" if source == "ema" else source or "recorded"


def _eval_results(
    task: Mapping[str, Any], values: Mapping[str, float], dataset: str | None
) -> list[EvalResult]:
    """The `model-index` entries of one task: its defined summary metrics only (see [`summary_metrics`])."""
    return [
        EvalResult(
            task_type=task_head_class(task["type"]).pipeline_tag,
            task_name=task["name"],
            dataset_type=dataset or "custom",
            dataset_name=dataset or f"{task['name']} evaluation data",
            metric_type=name,
            metric_name=name,
            metric_value=value,
        )
        for name, value in summary_metrics(values, task).items()
    ]


def save_example_image(folder: str | Path, image: Any) -> Path:
    """Saves `image` (a PIL image, or an array) as the folder's example image, shown by the card's widget.

    Args:
        folder (`str` or `Path`): a `save_pretrained` folder.
        image: an image of the task's data.

    Returns:
        `Path` of the written JPEG.
    """
    from PIL import Image

    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    path = Path(folder) / EXAMPLE_IMAGE
    picture.convert("RGB").save(path, quality=90)
    return path


def _widget(folder: Path, repo_id: str | None, title: str) -> list[dict[str, str]] | None:
    """The Hub inference widget's example: the folder's example image, once it has a Hub address to load from."""
    if repo_id is None or not (folder / EXAMPLE_IMAGE).is_file():
        return None
    return [{"src": f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_IMAGE}", "example_title": title}]


def _data_text(source: str | None) -> str | None:
    if source is None:
        return None
    if source == "demo":
        return "the synthetic shapes benchmark generated by `modsquad.data.demo`"
    return f"[{source}](https://huggingface.co/datasets/{source})" if hub_id(source) else f"`{source}`"


# ---------------------------------------------------------------------------------------------- multi-task
def render_multitask_card(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    pruned: list[dict[str, Any]] | None = None,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    training_data: Mapping[str, str] | None = None,
    base_model: str | None = None,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The card of a multi-task checkpoint.

    Args:
        folder (`str` or `Path`): its `save_pretrained` folder (may hold `expert_usage.json` / `.png`).
        repo_id (`str`, *optional*): its Hub repo id, used in the card and the loading snippet.
        pruned (`list[dict]`, *optional*): rows of the per-task models: `task`, `link` (markdown), and optionally
            `experts_text`, `params`, `max_abs_diff`.
        metrics (`Mapping`, *optional*): `{task: {metric: value}}` of this model.
        training_data (`Mapping`, *optional*): `{task: Hub dataset id, path or "demo"}`.
        base_model (`str`, *optional*): Hub id of the dense model it was upcycled from.
        license (`str`, *optional*, defaults to `"apache-2.0"`): a Hub license id.

    Returns:
        `huggingface_hub.ModelCard`
    """
    folder = Path(folder)
    config = ModSquadConfig.from_pretrained(folder)
    model_name = (repo_id or folder.name).split("/")[-1]
    metrics = {
        task["name"]: summary_metrics(metrics[task["name"]], task)
        for task in config.tasks
        if task["name"] in (metrics or {})
    }
    training_data = {t: s for t, s in (training_data or {}).items() if t in config.task_names}
    datasets = sorted({d for d in (hub_id(s, folder) for s in training_data.values()) if d})
    eval_results = [
        result
        for task in config.tasks
        if task["name"] in metrics
        for result in _eval_results(task, metrics[task["name"]], hub_id(training_data.get(task["name"])))
    ]
    base = hub_id(base_model)
    extra = {"base_model_relation": UPCYCLED_RELATION} if base else {}
    widget = _widget(folder, repo_id, f"{config.tasks[0]['name']} example")
    if widget:
        extra["widget"] = widget
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task_head_class(config.tasks[0]["type"]).pipeline_tag,
        tags=[*BASE_TAGS, "multi-task", *sorted({t["type"] for t in config.tasks})],
        datasets=datasets or None,
        base_model=base,
        license=license,
        metrics=sorted({name for values in metrics.values() for name in values}) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **extra,
    )
    usage_plot, usage_source = None, None
    if (folder / USAGE_FILE).is_file() and (folder / USAGE_PLOT).is_file():
        records = json.loads((folder / USAGE_FILE).read_text())
        usage_plot, usage_source = USAGE_PLOT, _usage_source(records[0]) if records else None
    return ModelCard.from_template(
        data,
        template_path=str(MULTITASK_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or _local_name(folder),
        tasks=[_task_view(t) for t in config.tasks],
        arch=_architecture(config),
        num_parameters_text=human_count(count_parameters(folder)),
        usage_plot=usage_plot,
        usage_source=usage_source,
        pruned=[
            {
                "task": row["task"],
                "link": row["link"],
                "experts_text": row.get("experts_text", "n/a"),
                "params_text": human_count(row.get("params_after")),
                "diff_text": "n/a" if row.get("max_abs_diff") is None else f"{row['max_abs_diff']:.1e}",
            }
            for row in pruned or []
        ],
        metrics=metrics,
        training_data={t: _data_text(s) for t, s in training_data.items()},
        license=license,
        citation=_citation(),
    )


# ------------------------------------------------------------------------------------------------- pruned
def _experts_rows(config: ModSquadConfig) -> list[dict[str, Any]]:
    parent = config.pruned_from or {}
    # Per router kind: kept indices, the parent's counts, this model's counts, and the blocks with such experts (the
    # per-block lists are indexed by position among those blocks).
    kinds = {
        "attention": (
            config.pruned_attention_experts,
            parent.get("attention_num_experts"),
            config.attention_experts_per_layer,
            config.attention_moe_layer_indices,
        ),
        "mlp": (
            config.pruned_experts,
            parent.get("num_experts"),
            config.experts_per_layer,
            config.moe_layer_indices,
        ),
    }
    rows = []
    # The routers in the model's order (`pruning.usage.router_layout`): block by block, attention before MLP.
    for block in sorted({*config.moe_layer_indices, *config.attention_moe_layer_indices}):
        for kind in ("attention", "mlp"):
            kept_lists, parent_totals, totals, blocks = kinds[kind]
            if kept_lists is None or block not in blocks:
                continue
            index = blocks.index(block)
            totals = parent_totals or totals
            total = totals[index] if isinstance(totals, list) else totals
            kept = kept_lists[index]
            rows.append(
                {
                    "name": f"block {block} {kind}",
                    "kept": len(kept),
                    "total": total,
                    "indices": ", ".join(map(str, kept)),
                }
            )
    return rows


def experts_kept_text(config: ModSquadConfig) -> str:
    """Experts kept of the parent's, over all MoE blocks, e.g. `"9/16 MLP, 11/16 attention"`."""
    parent = config.pruned_from or {}
    parts = []
    for kept, totals, kind in (
        (config.pruned_experts, parent.get("num_experts"), "MLP"),
        (config.pruned_attention_experts, parent.get("attention_num_experts"), "attention"),
    ):
        if kept is not None and totals:
            parts.append(f"{sum(map(len, kept))}/{sum(totals)} {kind}")
    return ", ".join(parts) or "n/a"


def _metric_rows(
    report: Mapping[str, Any] | None, parent_metrics: Mapping[str, float], task: Mapping[str, Any]
) -> list[dict[str, str]]:
    before = summary_metrics((report or {}).get("metrics_before") or parent_metrics, task)
    after = summary_metrics((report or {}).get("metrics_after") or {}, task)
    names = list(dict.fromkeys([*before, *after]))
    return [
        {
            "name": name,
            "before": f"{before[name]:.4f}" if name in before else "n/a",
            "after": f"{after[name]:.4f}" if name in after else "n/a",
        }
        for name in names
    ]


def render_task_card(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    parent_repo_id: str | None = None,
    report: Mapping[str, Any] | None = None,
    parent_metrics: Mapping[str, float] | None = None,
    training_data: str | None = None,
    license: str = DEFAULT_LICENSE,
) -> ModelCard:
    """The card of a pruned single-task checkpoint (made by [`prune_for_task`]).

    Args:
        folder (`str` or `Path`): its `save_pretrained` folder (may hold `expert_usage.json` / `.png`).
        repo_id (`str`, *optional*): its Hub repo id.
        parent_repo_id (`str`, *optional*): Hub repo id of the multi-task model it was cut from (the card's
            `base_model`); defaults to the parent's recorded `name_or_path` when that is a Hub id.
        report (`Mapping`, *optional*): its row of [`prune_run`]'s table (sizes, load times, exactness, metrics).
        parent_metrics (`Mapping`, *optional*): the parent's metrics on this task.
        training_data (`str`, *optional*): Hub dataset id, path or `"demo"`.
        license (`str`, *optional*, defaults to `"apache-2.0"`): a Hub license id.

    Returns:
        `huggingface_hub.ModelCard`
    """
    folder = Path(folder)
    config = ModSquadConfig.from_pretrained(folder)
    if config.num_tasks != 1:
        raise ValueError(
            f"{folder} holds {config.num_tasks} tasks; a per-task card needs a single-task model"
        )
    task = config.tasks[0]
    parent = config.pruned_from or {}
    parent_name = parent_repo_id or hub_id(parent.get("name_or_path"))
    model_name = (repo_id or folder.name).split("/")[-1]
    report = dict(report or {})
    metrics_after = summary_metrics(report.get("metrics_after") or {}, task)
    dataset = hub_id(training_data, folder)
    eval_results = _eval_results(task, metrics_after, dataset) if metrics_after else []
    widget = _widget(folder, repo_id, f"{task['name']} example")
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag=task_head_class(task["type"]).pipeline_tag,
        tags=[*BASE_TAGS, "pruned", task["type"]],
        datasets=[dataset] if dataset else None,
        base_model=parent_name,  # no base_model_relation: see UPCYCLED_RELATION
        license=license,
        metrics=sorted(metrics_after) or None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
        **({"widget": widget} if widget else {}),
    )
    usage_plot, usage_source = None, None
    if (folder / USAGE_FILE).is_file() and (folder / USAGE_PLOT).is_file():
        usage_plot = USAGE_PLOT
        usage_source = _usage_source(json.loads((folder / USAGE_FILE).read_text()))
    if parent_name:
        parent_link = f"[{parent_name}](https://huggingface.co/{parent_name})"
    else:
        parent_link = f"`{parent.get('name_or_path') or 'unknown'}`"
    if report.get("max_abs_diff") is not None:
        report["calibration_text"] = (
            f"{report['calibration_batches']} calibration batches"
            if report.get("calibration_batches")
            else "calibration data"
        )
    return ModelCard.from_template(
        data,
        template_path=str(PRUNED_TEMPLATE),
        model_name=model_name,
        repo_id=repo_id or _local_name(folder),
        task=_task_view(task),
        parent_link=parent_link,
        parent_tasks_text=", ".join(f"`{t}`" for t in parent.get("tasks", [])) or "n/a",
        report=report or None,
        experts=_experts_rows(config),
        usage_plot=usage_plot,
        usage_source=usage_source,
        before={
            "params": human_count(report.get("params_before")),
            "size": human_bytes(report.get("bytes_before")),
            "load": _seconds(report.get("load_s_before")),
        },
        after={
            "params": human_count(report.get("params_after") or count_parameters(folder)),
            "size": human_bytes(report.get("bytes_after") or weights_bytes(folder)),
            "load": _seconds(report.get("load_s_after")),
        },
        parent_parameters_text=human_count(parent.get("num_parameters"))
        if parent.get("num_parameters")
        else None,
        metrics=_metric_rows(report, parent_metrics or {}, task),
        training_data=_data_text(training_data),
        license=license,
        citation=_citation(),
    )


# ------------------------------------------------------------------------------------------------------ runs
def pruning_rows(run: RunFolder) -> dict[str, dict[str, Any]]:
    """The rows `prune_run` wrote to the run's `pruning.json`, by task (`{}` when absent)."""
    path = run.root / PRUNING_FILE
    if not path.is_file():
        return {}
    return {
        row["task"]: row for row in json.loads(path.read_text()) if isinstance(row, dict) and "task" in row
    }


def render_run_cards(
    run: RunFolder,
    repo_id: str | None = None,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    tasks: Sequence[str] | None = None,
) -> dict[Path, ModelCard]:
    """The cards of a run: its model folder's and each pruned task folder's, keyed by folder.

    Args:
        run ([`RunFolder`]): the run.
        repo_id (`str`, *optional*): Hub repo id of the main model; task models are `<repo_id>-<task>`.
        license (`str`, *optional*): a Hub license id.
        base_model (`str`, *optional*): Hub id of the dense model the main model was upcycled from.
        tasks (`Sequence[str]`, *optional*): only these task models (rendered, and linked from the main card).
    """
    config = run.config()
    metrics, training, rows = run.metrics(), run.training_data(), pruning_rows(run)
    found = run.task_dirs()
    # In the model's task order; folders of tasks the model does not have are not its pruned models.
    task_dirs = {t: found[t] for t in config.task_names if t in found and (tasks is None or t in tasks)}
    cards: dict[Path, ModelCard] = {}
    if config.pruned_from is not None:
        task = config.task_names[0]
        cards[run.model_dir] = render_task_card(
            run.model_dir,
            repo_id=repo_id,
            report=rows.get(task),
            parent_metrics=metrics.get(task),
            training_data=training.get(task),
            license=license,
        )
        return cards
    pruned = []
    for task, folder in task_dirs.items():
        task_repo = f"{repo_id}-{task}" if repo_id else None
        row = rows.get(task, {})
        link = f"[{task_repo}](https://huggingface.co/{task_repo})" if task_repo else f"`tasks/{task}`"
        task_config = ModSquadConfig.from_pretrained(folder)
        pruned.append(
            {
                **row,
                "task": task,
                "link": link,
                "experts_text": experts_kept_text(task_config),
                "params_after": row.get("params_after") or count_parameters(folder),
            }
        )
        cards[folder] = render_task_card(
            folder,
            repo_id=task_repo,
            parent_repo_id=repo_id,
            report=row,
            parent_metrics=metrics.get(task),
            training_data=training.get(task),
            license=license,
        )
    cards[run.model_dir] = render_multitask_card(
        run.model_dir,
        repo_id=repo_id,
        pruned=pruned,
        metrics=metrics,
        training_data=training,
        base_model=base_model,
        license=license,
    )
    return cards


def write_run_cards(run: RunFolder, **kwargs: Any) -> list[Path]:
    """Renders the run's cards ([`render_run_cards`] arguments) and saves each as its folder's README.md."""
    written = []
    for folder, card in render_run_cards(run, **kwargs).items():
        card.save(folder / CARD_FILE)
        written.append(folder / CARD_FILE)
    return written


__all__ = [
    "CARD_FILE",
    "EXAMPLE_IMAGE",
    "experts_kept_text",
    "hub_id",
    "pruning_rows",
    "render_multitask_card",
    "render_run_cards",
    "render_task_card",
    "save_example_image",
    "write_run_cards",
]
