"""`modsquad benchmark moe`: one MoE MLP layer against a dense MLP of the same active size, per experts kernel.

The MoE layer (router + experts, `ModSquadSparseMLP`) does exactly the FLOPs of a dense GELU MLP whose hidden width
is `top_k * expert_intermediate_size`, so `moe / dense` measures the pure overhead of routing: sort, gather,
scatter and many small GEMMs instead of one large one. Dense and MoE timings are interleaved repeat by repeat and
summarised by their medians, so a machine shared with other processes slows both alike and the ratio holds.

One effect interleaving cannot cancel: with several threads, every parallel operation waits for all of them, and
on a CPU other processes keep busy that wait can last a scheduler time slice (milliseconds). The MoE layer runs
more parallel operations than a dense MLP (router, gather, combine), so its ratio grows with the machine's load;
`--threads 1` has no such waits and shows the kernels' own cost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..model.configuration_modsquad import ModSquadConfig
from ..model.modeling_modsquad import ModSquadMLP
from ..model.moe import ModSquadSparseMLP
from ..model.sorted_mm import SORTED_MM

# Kernels this command knows how to run on CPU, in table order. `batched_mm` gathers one full expert weight
# matrix per token slot, so it is only timed for inference and only while that gather stays small.
IMPLEMENTATIONS = ("eager", SORTED_MM, "grouped_mm", "batched_mm")
FORWARD_ONLY = ("batched_mm",)
MODES = ("fwd", "fwd+bwd")
DENSE = "dense"


@dataclass(frozen=True)
class MoECase:
    """One MoE layer shape: `batch x tokens` tokens of width `hidden`, `num_experts` GELU experts of width
    `expert_intermediate_size`, `top_k` experts per token."""

    name: str
    batch: int
    tokens: int
    hidden: int
    num_experts: int
    expert_intermediate_size: int
    top_k: int

    @property
    def dense_intermediate_size(self) -> int:
        return self.top_k * self.expert_intermediate_size

    def describe(self) -> str:
        return (
            f"{self.batch}x{self.tokens} tokens, hidden {self.hidden}, {self.num_experts} experts of "
            f"{self.expert_intermediate_size}, top-{self.top_k} (dense MLP of {self.dense_intermediate_size})"
        )


CASES = {
    "a": MoECase("a", 8, 197, 384, 16, 1536, 2),
    # The Mod-Squad base layout (ViT-B, 16 experts of 768, top-4).
    "b": MoECase("b", 8, 197, 768, 16, 768, 4),
}


@dataclass
class Measurement:
    """Median milliseconds of one implementation in one mode, or why it was not run.

    `ratio` is `moe_ms / dense_ms` (medians); `best_ratio` compares the fastest runs, close to what an idle machine
    would show when other processes share this one.
    """

    case: str
    implementation: str
    mode: str
    moe_ms: float | None = None
    dense_ms: float | None = None
    ratio: float | None = None
    best_ratio: float | None = None
    skipped: str | None = None


# ----------------------------------------------------------------------------------------------- arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the `benchmark` sub-command's arguments to `parser`."""
    parser.add_argument("what", choices=["moe"], help="what to time: `moe`, one MoE MLP layer against dense")
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted(CASES),
        default=sorted(CASES),
        help="; ".join(f"{name}: {case.describe()}" for name, case in CASES.items()),
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        default=list(IMPLEMENTATIONS),
        choices=IMPLEMENTATIONS,
        metavar="NAME",
        help=f"experts implementations to time (default: {' '.join(IMPLEMENTATIONS)})",
    )
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per measurement (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed repeats first (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument(
        "--max-gather-gb",
        type=float,
        default=2.0,
        help="skip batched_mm when its gathered expert weights would exceed this many GB (default 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, tokens and routers (default 0)")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement to this JSON file")


def _check_args(args: argparse.Namespace) -> None:
    unknown = [name for name in args.implementations if name not in IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"unknown experts implementations {unknown}; accepted: {list(IMPLEMENTATIONS)}")
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")


# ------------------------------------------------------------------------------------------------- layers
def build_layers(case: MoECase, seed: int = 0) -> tuple[ModSquadSparseMLP, ModSquadMLP, ModSquadConfig]:
    """The MoE layer of `case` with a trained-like router, and the dense GELU MLP of the same active size.

    A freshly initialised router is all zeros and sends every token to the same top-k experts; a random router
    (std `1/sqrt(hidden)`, logits of unit scale) spreads tokens over experts as a trained one does.

    Returns:
        `(moe, dense, config)`; switch the MoE kernel with `config._experts_implementation = name`.
    """
    config = ModSquadConfig(
        hidden_size=case.hidden,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_experts=case.num_experts,
        num_experts_per_tok=case.top_k,
        expert_intermediate_size=case.expert_intermediate_size,
        moe_layers="all",
    )
    generator = torch.Generator().manual_seed(seed)
    moe = ModSquadSparseMLP(config, case.num_experts)
    dense = ModSquadMLP(config)
    std = config.initializer_range
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0 / math.sqrt(case.hidden), generator=generator)
        for weight in (moe.experts.up_proj, moe.experts.down_proj, dense.fc1.weight, dense.fc2.weight):
            weight.normal_(0.0, std, generator=generator)
        for bias in (moe.experts.up_proj_bias, moe.experts.down_proj_bias, dense.fc1.bias, dense.fc2.bias):
            bias.normal_(0.0, std, generator=generator)
    return moe, dense, config


def batched_mm_gather_gb(case: MoECase) -> float:
    """GB of expert weights `batched_mm` gathers at its peak: the up and down matrices of every token slot."""
    slots = case.batch * case.tokens * case.top_k
    return 2 * slots * case.hidden * case.expert_intermediate_size * 4 / 1e9


# ------------------------------------------------------------------------------------------------- timing
def skip_reason(case: MoECase, implementation: str, mode: str, max_gather_gb: float = 2.0) -> str | None:
    """Why `implementation` is not timed in `mode` on `case`, or `None` when it is."""
    if mode != "fwd" and implementation in FORWARD_ONLY:
        return "forward only: it copies an expert weight matrix per token slot, too much memory to train"
    gather_gb = batched_mm_gather_gb(case)
    if implementation == "batched_mm" and gather_gb > max_gather_gb:
        return f"would gather {gather_gb:.1f} GB of expert weights (limit: --max-gather-gb {max_gather_gb:g})"
    return None


def _step(layer: nn.Module, hidden: torch.Tensor, grad_out: torch.Tensor, mode: str) -> None:
    """One forward (inference, no graph) or one forward + backward, as a training step runs it."""
    if mode == "fwd":
        with torch.no_grad():
            layer(hidden, 0)
        return
    for param in layer.parameters():
        param.grad = None
    hidden.grad = None
    out, _ = layer(hidden, 0)
    out.backward(grad_out)


def interleaved_samples(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Milliseconds of every step, round after round; each round runs every step once, in an order rotated from
    round to round, so a slow spell of a shared machine hits all steps alike.

    Returns:
        `dict[str, list[float]]`: `repeats` timings per step (the `warmup` rounds are dropped).
    """
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            elapsed_ms = (time.perf_counter() - start) * 1e3
            if round_index >= warmup:
                samples[name].append(elapsed_ms)
    return samples


def measure_case(
    case: MoECase,
    implementations: list[str],
    repeats: int,
    warmup: int,
    max_gather_gb: float = 2.0,
    seed: int = 0,
) -> list[Measurement]:
    """Times the MoE layer of `case` under each experts implementation against the dense MLP, in both modes.

    Args:
        case ([`MoECase`]): layer shape.
        implementations (`list[str]`): experts implementations, names from `IMPLEMENTATIONS`.
        repeats (`int`): timed rounds; a round times dense and every implementation once.
        warmup (`int`): untimed rounds first.
        max_gather_gb (`float`): `batched_mm` is skipped above this peak gather size.
        seed (`int`): seed of weights, router and tokens.

    Returns:
        One [`Measurement`] per `(mode, implementation)`: medians in milliseconds, `ratio = moe_ms / dense_ms`.
    """
    moe, dense, config = build_layers(case, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (case.batch, case.tokens, case.hidden)
    hidden = torch.randn(shape, generator=generator).requires_grad_(True)
    grad_out = torch.randn(shape, generator=generator)

    def moe_step(name: str, mode: str) -> Callable[[], None]:
        def step() -> None:
            config._experts_implementation = name
            _step(moe, hidden, grad_out, mode)

        return step

    results = []
    for mode in MODES:
        skipped = {name: skip_reason(case, name, mode, max_gather_gb) for name in implementations}
        steps = {DENSE: lambda mode=mode: _step(dense, hidden, grad_out, mode)}
        steps.update({name: moe_step(name, mode) for name in implementations if skipped[name] is None})
        samples = interleaved_samples(steps, repeats, warmup)
        dense_ms = statistics.median(samples[DENSE])
        for name in implementations:
            measurement = Measurement(case.name, name, mode, dense_ms=dense_ms, skipped=skipped[name])
            if name in samples:
                measurement.moe_ms = statistics.median(samples[name])
                measurement.ratio = measurement.moe_ms / dense_ms
                measurement.best_ratio = min(samples[name]) / min(samples[DENSE])
            results.append(measurement)
    return results


# ------------------------------------------------------------------------------------------------- report
def format_table(case: MoECase, measurements: list[Measurement]) -> str:
    """A plain-text table of one case: median ms and `moe / dense` per implementation and mode."""
    lines = [f"case {case.name}: {case.describe()}"]
    header = f"  {'implementation':<16}{'mode':<10}{'moe ms':>10}{'dense ms':>10}{'moe/dense':>11}{'best-run ratio':>16}"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for m in measurements:
        if m.skipped:
            lines.append(f"  {m.implementation:<16}{m.mode:<10}  skipped: {m.skipped}")
        else:
            lines.append(
                f"  {m.implementation:<16}{m.mode:<10}{m.moe_ms:>10.2f}{m.dense_ms:>10.2f}{m.ratio:>10.2f}x"
                f"{m.best_ratio:>15.2f}x"
            )
    return "\n".join(lines)


def _load_average() -> float | None:
    """1-minute load average (`None` where the OS has none): how shared the machine was while timing."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    """Runs `modsquad benchmark moe`: prints one table per case (and writes `--json`); returns the exit status."""
    _check_args(args)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32; medians of {args.repeats} "
        f"interleaved repeats after {args.warmup} warm-up rounds. fwd: inference (no graph); fwd+bwd: training "
        f"step of the layer (router included, input gradient included). Load average at start: {_load_average()}"
    )
    report = []
    for name in args.cases:
        case = CASES[name]
        measurements = measure_case(
            case, args.implementations, args.repeats, args.warmup, args.max_gather_gb, args.seed
        )
        print()
        print(format_table(case, measurements))
        report.append({"case": asdict(case), "measurements": [asdict(m) for m in measurements]})
    print(f"\nload average at end: {_load_average()}")
    if args.json:
        summary = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cases": report}
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


__all__ = [
    "CASES",
    "IMPLEMENTATIONS",
    "Measurement",
    "MoECase",
    "add_arguments",
    "build_layers",
    "format_table",
    "interleaved_samples",
    "measure_case",
    "run",
    "skip_reason",
]
