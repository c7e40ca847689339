"""`modsquad inspect`: what a checkpoint holds (tasks, experts per MoE block, parameters by part, where a pruned
model came from) without loading its weights, and optionally its expert-usage heat-map.

Example:

```
modsquad inspect runs/demo/tasks/seg
modsquad inspect runs/demo --plot usage.png
```
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from ..hub.model_card import human_bytes, human_count
from ..model.configuration_modsquad import ModSquadConfig
from ..pruning.prune import kept_experts_per_router
from ..pruning.usage import ExpertUsage, router_layout, router_positions, run_ema_usage
from ..run_folder import USAGE_FILE, RunFolder, weight_files, weights_bytes

# Parameter groups by key, first match wins.
PARAMETER_GROUPS = (
    ("routers", re.compile(r"\.router\.weight$")),
    ("MLP experts", re.compile(r"\.mlp\.experts\.")),
    ("attention experts", re.compile(r"\.attention\.(q_proj|o_proj)(_bias)?$")),
    ("embeddings and task tokens", re.compile(r"^modsquad\.embeddings\.")),
    ("dense backbone", re.compile(r"^modsquad\.")),
)
_HEAD = re.compile(r"^heads\.([^.]+)\.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `inspect` sub-command's arguments to `parser`."""
    parser.add_argument("checkpoint", help="a save_pretrained folder or a run folder")
    parser.add_argument(
        "--plot",
        metavar="PNG",
        help="write the expert-usage heat-map (from the folder's expert_usage.json or the run's EMA usage)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the description to this JSON file")


def parameter_groups(folder: str | Path) -> dict[str, int]:
    """Parameters of a saved model by part (routers, MLP experts, attention experts, embeddings, dense backbone,
    `head <task>`), read from the safetensors headers."""
    from safetensors import safe_open

    groups: dict[str, int] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (safe_open is not a dict)
                head = _HEAD.match(key)
                group = f"head {head.group(1)}" if head else "other"
                if not head:
                    group = next((name for name, pattern in PARAMETER_GROUPS if pattern.search(key)), "other")
                groups[group] = groups.get(group, 0) + math.prod(handle.get_slice(key).get_shape())
    return groups


def describe_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A JSON-serialisable description of a saved ModSquad model."""
    folder = Path(folder)
    config = ModSquadConfig.from_pretrained(folder)
    kept = {"mlp": config.pruned_experts, "attention": config.pruned_attention_experts}
    position = router_positions(config)
    routers = []
    for slot in router_layout(config):
        limits = (
            config.routable_attention_experts_per_layer
            if slot.kind == "attention"
            else config.routable_experts_per_layer
        )[position[slot.kind][slot.block]]
        routers.append(
            {
                "router": slot.name,
                "experts": slot.num_experts,
                "routable_per_task": dict(zip(config.task_names, limits)),
                "original_experts": kept[slot.kind][position[slot.kind][slot.block]]
                if kept[slot.kind] is not None
                else None,
            }
        )
    groups = parameter_groups(folder)
    return {
        "folder": str(folder),
        "architectures": config.architectures,
        "tasks": [
            {"name": t["name"], "type": t["type"], "num_labels": t.get("num_labels")} for t in config.tasks
        ],
        "moe_blocks": config.moe_layer_indices,
        "attention_moe_blocks": config.attention_moe_layer_indices,
        "top_k": config.num_experts_per_tok,
        "attention_top_k": config.attention_experts_per_tok if config.moe_attention else None,
        "routers": routers,
        "parameters": sum(groups.values()),
        "parameter_groups": groups,
        "weights_bytes": weights_bytes(folder),
        "pruned_from": config.pruned_from,
    }


def format_description(description: dict[str, Any]) -> str:
    lines = [
        f"{description['folder']}: {', '.join(description['architectures'] or ['(no architecture recorded)'])}"
    ]
    lines.append("tasks:")
    for task in description["tasks"]:
        labels = f", {task['num_labels']} labels" if task["num_labels"] else ""
        lines.append(f"  {task['name']} ({task['type']}{labels})")
    lines.append(f"MoE blocks {description['moe_blocks']}, top-{description['top_k']} MLP experts per token")
    if description["attention_top_k"]:
        lines.append(f"  and top-{description['attention_top_k']} attention experts per token")
    for router in description["routers"]:
        limited = {t: n for t, n in router["routable_per_task"].items() if n < router["experts"]}
        line = f"  {router['router']:<20} {router['experts']:>3} experts"
        if router["original_experts"] is not None:
            line += f"  kept from the parent: {router['original_experts']}"
        if limited:
            line += f"  routable: {limited}"
        lines.append(line)
    lines.append(
        f"parameters: {human_count(description['parameters'])} "
        f"({description['parameters']:,}), weights {human_bytes(description['weights_bytes'])}"
    )
    for group, count in sorted(description["parameter_groups"].items(), key=lambda item: -item[1]):
        lines.append(f"  {group:<28} {count:>14,}")
    parent = description["pruned_from"]
    if parent:
        lines.append(
            f"pruned from {parent.get('name_or_path') or '(unknown)'} (tasks {parent.get('tasks')}, "
            f"{human_count(parent.get('num_parameters'))} parameters)"
        )
    return "\n".join(lines)


def stored_usage(run: RunFolder) -> list[ExpertUsage]:
    """Usage saved with a checkpoint (`expert_usage.json`: one task's record or a list), else the run's EMA."""
    path = run.model_dir / USAGE_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        return [ExpertUsage.from_dict(u) for u in (data if isinstance(data, list) else [data])]
    config = run.config()
    return [u for t, u in run_ema_usage(run, config).items() if t in config.task_names]


def run(args: argparse.Namespace) -> int:
    """Runs `modsquad inspect`; returns the exit status."""
    folder = RunFolder.open(args.checkpoint)
    description = describe_checkpoint(folder.model_dir)
    print(format_description(description))
    if folder.task_dirs():
        print(f"pruned task models: {', '.join(str(p) for p in folder.task_dirs().values())}")
    if args.plot:
        from ..pruning.heatmap import plot_router_usage

        usages = stored_usage(folder)
        if not usages:
            raise ValueError(
                f"{args.checkpoint} holds no expert usage (expert_usage.json or the run's expert_usage_ema.json); "
                "`modsquad prune RUN --dataset ...` records it"
            )
        config = folder.config()
        # A pruned model's own usage (one task): outline the experts it kept.
        kept = (
            kept_experts_per_router(config)
            if config.pruned_experts is not None and len(usages) == 1
            else None
        )
        plot_router_usage(usages, args.plot, kept=kept, title=Path(args.checkpoint).name)
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(description, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


__all__ = ["add_arguments", "describe_checkpoint", "format_description", "parameter_groups", "run"]
