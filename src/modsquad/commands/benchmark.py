"""`modsquad benchmark moe | model | memory | samplers`.

`moe`: one MoE MLP layer against a dense MLP of the same active size, per experts kernel.

`model`: a whole ModSquad backbone (and a pruned one) against Transformers' `ViTModel` of the same active size,
forward and training step, in images per second.

`memory`: the allocator's peak memory of one multi-task training step (forward and backward) of a ViT-B/16-shaped
Mod-Squad model, as one graph over every task micro-batch against one task graph at a time (`training.memory`).

`samplers`: the demo trained under each task-mixing strategy at equal images seen, with the per-step and the
streaming mutual-information estimators: final metrics per task and `I(T;E)` per MoE router (see
[`run_samplers`]).

The MoE layer (router + experts, `ModSquadSparseMLP`) does exactly the FLOPs of a dense GELU MLP whose hidden width
is `top_k * expert_intermediate_size`, so `moe / dense` measures the pure overhead of routing: sort, gather,
scatter and many small GEMMs instead of one large one. Dense and MoE timings are interleaved repeat by repeat and
summarised by their medians, so a machine shared with other processes slows both alike and the ratio holds.

One effect interleaving cannot cancel: with several threads, every parallel operation waits for all of them, and
on a CPU other processes keep busy that wait can last a scheduler time slice (milliseconds). The MoE layer runs
more parallel operations than a dense MLP (router, gather, combine), so its ratio grows with the machine's load;
`--threads 1` has no such waits and shows the kernels' own cost.

The model benchmark builds the ViT-S/16 shape (12 blocks, hidden 384, 6 heads, 224 px): the dense `ViTModel` with
MLPs of 1536, and ModSquad with every other block a mixture of 16 experts of 384, top-4 (active MLP width 1536,
the same FLOPs per token), plus ModSquad pruned to the experts its task uses (usage collected on random images,
experts above the uniform share kept: the same active FLOPs over fewer, more used experts). ModSquad's sequence
has one token more (the task token: 198 against 197). A training step is forward, loss, backward and AdamW step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.mixing import STRATEGIES
from ..model.configuration_modsquad import ModSquadConfig
from ..model.modeling_modsquad import ModSquadMLP
from ..model.moe import ModSquadSparseMLP
from ..model.sorted_mm import AUTO, SORTED_MM
from ..training.recipe import MI_ESTIMATORS, TrainingRecipe

# Kernels this command knows how to run on CPU, in table order. `batched_mm` gathers one full expert weight
# matrix per token slot, so it is only timed for inference and only while that gather stays small. `auto` (the
# default of models) runs `sorted_mm` on CPU and a grouped GEMM on GPUs.
IMPLEMENTATIONS = ("eager", SORTED_MM, "grouped_mm", "batched_mm", AUTO)
MOE_DEFAULT_IMPLEMENTATIONS = ("eager", SORTED_MM, "grouped_mm", "batched_mm")
WHATS = ("moe", "model", "memory", "samplers")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
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


@dataclass(frozen=True)
class ModelCase:
    """One whole-model shape: `batch` images of `image_size` px in `patch_size` px patches, `layers` blocks of width
    `hidden` with `heads` heads; ModSquad's MoE blocks (`moe_layers`) hold `num_experts` GELU experts of
    `expert_intermediate_size`, `top_k` per token, and the dense ViT's MLPs are `top_k * expert_intermediate_size`
    wide."""

    name: str
    batch: int
    image_size: int
    patch_size: int
    hidden: int
    layers: int
    heads: int
    num_experts: int
    expert_intermediate_size: int
    top_k: int
    moe_layers: str = "every_other"

    @property
    def dense_intermediate_size(self) -> int:
        return self.top_k * self.expert_intermediate_size

    def describe(self) -> str:
        return (
            f"batch {self.batch} at {self.image_size} px, patch {self.patch_size}: {self.layers} blocks, hidden "
            f"{self.hidden}, MoE {self.moe_layers.replace('_', ' ')} block, {self.num_experts} experts of "
            f"{self.expert_intermediate_size}, top-{self.top_k} (dense ViT MLP {self.dense_intermediate_size})"
        )


MODEL_CASES = {
    # ViT-S/16 with Mod-Squad's MoE blocks: what the paper's small model computes per token.
    "s16": ModelCase("s16", 8, 224, 16, 384, 12, 6, 16, 384, 4),
}
# Rows of the model benchmark: the dense baseline, ModSquad, ModSquad pruned; its modes.
DENSE_VIT, MODSQUAD, PRUNED = "vit", "modsquad", "modsquad-pruned"
MODEL_MODES = ("fwd", "fwd+bwd", "train")


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
    parser.add_argument(
        "what",
        choices=WHATS,
        help="what to measure: `moe`, one MoE MLP layer against dense; `model`, a whole ModSquad backbone (and a "
        "pruned one) against a dense Transformers ViTModel of the same active size; `memory`, peak memory of a "
        "multi-task step, one graph vs one task at a time; `samplers`, the demo under each mixing strategy, "
        "per-step vs streaming MI",
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=sorted({**CASES, **MODEL_CASES}),
        help="moe (default all): "
        + "; ".join(f"{name}: {case.describe()}" for name, case in CASES.items())
        + ". model (default all): "
        + "; ".join(f"{name}: {case.describe()}" for name, case in MODEL_CASES.items()),
    )
    parser.add_argument(
        "--implementations",
        nargs="+",
        choices=IMPLEMENTATIONS,
        metavar="NAME",
        help=f"experts implementations to time (moe default: {' '.join(MOE_DEFAULT_IMPLEMENTATIONS)}; model "
        f"default: {AUTO}, the models' default)",
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per batch of the model benchmark (default: the case's)"
    )
    parser.add_argument("--device", default="cpu", help="device to time on: cpu (default), cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="weights and inputs dtype (default float32)",
    )
    parser.add_argument(
        "--repeats", type=int, help="timed repeats per measurement (default 30 for moe, 10 for model)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODEL_MODES,
        default=list(MODEL_MODES),
        help="modes of the model benchmark: fwd (inference), fwd+bwd (forward, loss, backward), train (fwd+bwd "
        "and an AdamW step, which pays for every expert's parameters); default all",
    )
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
    memory = parser.add_argument_group("memory")
    memory.add_argument(
        "--memory-case",
        choices=sorted(MEMORY_CASES),
        default="vit-b16",
        help="; ".join(f"{name}: {case.describe()}" for name, case in MEMORY_CASES.items()),
    )
    memory.add_argument(
        "--no-per-task",
        dest="per_task",
        action="store_false",
        help="skip the single-task steps (the largest of them is what one task at a time should cost)",
    )
    add_sampler_arguments(parser.add_argument_group("samplers"))


def _check_args(args: argparse.Namespace) -> None:
    cases = CASES if args.what == "moe" else MODEL_CASES
    if args.cases is None:
        args.cases = sorted(cases)
    if args.implementations is None:
        args.implementations = list(MOE_DEFAULT_IMPLEMENTATIONS) if args.what == "moe" else [AUTO]
    if args.repeats is None:
        args.repeats = 30 if args.what == "moe" else 10
    wrong = [name for name in args.cases if name not in cases]
    if wrong:
        raise ValueError(f"cases {wrong} are not `benchmark {args.what}` cases; accepted: {sorted(cases)}")
    unknown = [name for name in args.implementations if name not in IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"unknown experts implementations {unknown}; accepted: {list(IMPLEMENTATIONS)}")
    for name in ("repeats", "threads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r}; accepted: {sorted(DTYPES)}")
    try:
        torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(
            f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)"
        ) from error


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


def _synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (GPU kernels run asynchronously); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_samples(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Milliseconds of every step, round after round; each round runs every step once, in an order rotated from
    round to round, so a slow spell of a shared machine hits all steps alike. On a GPU each step is timed up to
    the end of its kernels.

    Returns:
        `dict[str, list[float]]`: `repeats` timings per step (the `warmup` rounds are dropped).
    """
    device = torch.device(device)
    names = list(steps)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start = time.perf_counter()
            steps[name]()
            _synchronize(device)
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
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Measurement]:
    """Times the MoE layer of `case` under each experts implementation against the dense MLP, in both modes.

    Args:
        case ([`MoECase`]): layer shape.
        implementations (`list[str]`): experts implementations, names from `IMPLEMENTATIONS`.
        repeats (`int`): timed rounds; a round times dense and every implementation once.
        warmup (`int`): untimed rounds first.
        max_gather_gb (`float`): `batched_mm` is skipped above this peak gather size.
        seed (`int`): seed of weights, router and tokens.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): where to time.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): weights and tokens dtype.

    Returns:
        One [`Measurement`] per `(mode, implementation)`: medians in milliseconds, `ratio = moe_ms / dense_ms`.
    """
    moe, dense, config = build_layers(case, seed)
    moe.to(device, dtype)
    dense.to(device, dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    shape = (case.batch, case.tokens, case.hidden)
    hidden = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(True)
    grad_out = torch.randn(shape, generator=generator).to(device, dtype)

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
        samples = interleaved_samples(steps, repeats, warmup, device)
        dense_ms = statistics.median(samples[DENSE])
        for name in implementations:
            measurement = Measurement(case.name, name, mode, dense_ms=dense_ms, skipped=skipped[name])
            if name in samples:
                measurement.moe_ms = statistics.median(samples[name])
                measurement.ratio = measurement.moe_ms / dense_ms
                measurement.best_ratio = min(samples[name]) / min(samples[DENSE])
            results.append(measurement)
    return results


# -------------------------------------------------------------------------------------------- whole model
@dataclass
class ModelMeasurement:
    """Median milliseconds per batch of one model in one mode, with images per second, against the dense ViT.

    `ratio` is `ms / dense_ms` (medians; 1.0 = dense cost, lower is faster), `best_ratio` the fastest runs'.
    """

    case: str
    model: str
    implementation: str | None
    mode: str
    batch: int
    ms: float
    dense_ms: float
    images_per_second: float
    dense_images_per_second: float
    ratio: float
    best_ratio: float


def _modsquad_config(case: ModelCase, **overrides) -> ModSquadConfig:
    return ModSquadConfig(
        tasks=[{"name": "cls", "type": "image-classification", "num_labels": 10}],
        hidden_size=case.hidden,
        num_hidden_layers=case.layers,
        num_attention_heads=case.heads,
        image_size=case.image_size,
        patch_size=case.patch_size,
        num_experts=case.num_experts,
        num_experts_per_tok=case.top_k,
        expert_intermediate_size=case.expert_intermediate_size,
        moe_layers=case.moe_layers,
        **overrides,
    )


def build_models(case: ModelCase, seed: int = 0) -> dict[str, nn.Module]:
    """The backbones the model benchmark compares, in eval mode on CPU.

    Returns:
        `{"vit": ViTModel, "modsquad": ModSquadModel, "modsquad-pruned": ModSquadModel}`: the dense ViT, ModSquad
        with trained-like routers (random, logits of unit scale: tokens spread over experts as after training; a
        fresh router is all zeros), and ModSquad pruned to the experts its task used on random images above the
        uniform share (`1 / num_experts`) of selections.
    """
    from transformers import ViTConfig, ViTModel

    from ..model.head_classification import ModSquadForImageClassification
    from ..pruning.prune import prune_for_task
    from ..pruning.usage import collect_expert_usage

    torch.manual_seed(seed)
    vit = ViTModel(
        ViTConfig(
            hidden_size=case.hidden,
            num_hidden_layers=case.layers,
            num_attention_heads=case.heads,
            intermediate_size=case.dense_intermediate_size,
            image_size=case.image_size,
            patch_size=case.patch_size,
        ),
        add_pooling_layer=False,
    )
    full = ModSquadForImageClassification(_modsquad_config(case))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in full.named_parameters():
            if name.endswith("router.weight"):
                param.normal_(0.0, 1.0 / math.sqrt(case.hidden), generator=generator)
    images = [
        torch.randn(case.batch, 3, case.image_size, case.image_size, generator=generator) for _ in range(2)
    ]
    usage = collect_expert_usage(full, images, "cls")
    pruned = prune_for_task(full, "cls", usage, threshold=1.0 / case.num_experts)
    return {DENSE_VIT: vit.eval(), MODSQUAD: full.modsquad.eval(), PRUNED: pruned.modsquad.eval()}


def _model_loss(output) -> torch.Tensor:
    """A training loss on the backbone's tokens (heads are negligible next to it), plus ModSquad's router losses."""
    loss = output.last_hidden_state.float().square().mean()
    aux = getattr(output, "aux_loss", None)
    return loss + aux if aux is not None else loss


def _model_step(model: nn.Module, pixel_values: torch.Tensor, mode: str, optimizer=None) -> None:
    """An inference forward (`fwd`), forward and backward (`fwd+bwd`) or a training step (`train`: and the AdamW
    step)."""
    if mode == "fwd":
        with torch.no_grad():
            model(pixel_values)
        return
    model.zero_grad(set_to_none=True)
    _model_loss(model(pixel_values)).backward()
    if mode == "train":
        optimizer.step()


def measure_model_case(
    case: ModelCase,
    implementations: list[str],
    repeats: int,
    warmup: int,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    models: dict[str, nn.Module] | None = None,
    modes: Sequence[str] = MODEL_MODES,
) -> tuple[list[ModelMeasurement], dict[str, object]]:
    """Times the ModSquad backbone under each experts implementation and the pruned one (default kernel) against the
    dense ViT, interleaved, for inference and training.

    Args:
        case ([`ModelCase`]): model shape and batch.
        implementations (`list[str]`): experts implementations of the full ModSquad model (the pruned one runs the
            first).
        repeats (`int`): timed rounds; a round times every model once.
        warmup (`int`): untimed rounds first.
        seed (`int`): seed of weights, routers and images.
        device (`torch.device` or `str`, *optional*, defaults to `"cpu"`): where to time.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): weights and images dtype.
        models (`dict[str, nn.Module]`, *optional*): the output of [`build_models`] (built when not given).
        modes (`Sequence[str]`, *optional*): of `MODEL_MODES`: `fwd`, `fwd+bwd`, `train` (with an AdamW step).

    Returns:
        One [`ModelMeasurement`] per `(mode, model row)`, and facts about the models (parameters, experts kept).
    """
    models = models if models is not None else build_models(case, seed)
    for model in models.values():
        model.to(device, dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    pixel_values = torch.randn(case.batch, 3, case.image_size, case.image_size, generator=generator)
    pixel_values = pixel_values.to(device, dtype)
    config = models[MODSQUAD].config
    rows = [(MODSQUAD, name) for name in implementations] + [(PRUNED, implementations[0])]

    results = []
    unknown = [mode for mode in modes if mode not in MODEL_MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; accepted: {list(MODEL_MODES)}")
    for mode in modes:
        optimizers = {}
        if mode == "train":
            optimizers = {
                name: torch.optim.AdamW(model.parameters(), lr=1e-6) for name, model in models.items()
            }
        for model in models.values():
            model.train(mode != "fwd")

        def model_step(
            model_name: str, implementation: str | None, mode: str = mode, optimizers: dict = optimizers
        ) -> Callable[[], None]:
            model, optimizer = models[model_name], optimizers.get(model_name)

            def step() -> None:
                if implementation is not None:
                    model.config._experts_implementation = implementation
                _model_step(model, pixel_values, mode, optimizer)

            return step

        steps = {DENSE_VIT: model_step(DENSE_VIT, None)}
        steps.update({f"{model}/{impl}": model_step(model, impl) for model, impl in rows})
        samples = interleaved_samples(steps, repeats, warmup, device)
        dense_ms = statistics.median(samples[DENSE_VIT])
        for key in steps:
            model_name, _, implementation = key.partition("/")
            ms = statistics.median(samples[key])
            results.append(
                ModelMeasurement(
                    case=case.name,
                    model=model_name,
                    implementation=implementation or None,
                    mode=mode,
                    batch=case.batch,
                    ms=ms,
                    dense_ms=dense_ms,
                    images_per_second=case.batch / ms * 1e3,
                    dense_images_per_second=case.batch / dense_ms * 1e3,
                    ratio=ms / dense_ms,
                    best_ratio=min(samples[key]) / min(samples[DENSE_VIT]),
                )
            )
        for model in models.values():
            model.zero_grad(set_to_none=True)
    config._experts_implementation = implementations[0]
    facts = {
        "parameters": {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()},
        "pruned_experts_per_moe_block": list(models[PRUNED].config.experts_per_layer),
        "tokens": {DENSE_VIT: (case.image_size // case.patch_size) ** 2 + 1, MODSQUAD: None},
    }
    facts["tokens"][MODSQUAD] = facts["tokens"][DENSE_VIT] + 1  # the task token
    return results, facts


def format_model_table(case: ModelCase, measurements: list[ModelMeasurement], facts: dict) -> str:
    """A plain-text table of one model case: median ms per batch, images per second and the ratio to dense."""
    params = facts["parameters"]
    lines = [
        f"case {case.name}: {case.describe()}",
        f"  parameters: vit {params[DENSE_VIT] / 1e6:.1f} M, modsquad {params[MODSQUAD] / 1e6:.1f} M, pruned "
        f"{params[PRUNED] / 1e6:.1f} M (experts per MoE block {facts['pruned_experts_per_moe_block']})",
    ]
    header = f"  {'model':<18}{'kernel':<12}{'mode':<7}{'ms/batch':>10}{'img/s':>9}{'vs dense':>10}{'best-run ratio':>16}"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for m in measurements:
        lines.append(
            f"  {m.model:<18}{m.implementation or '-':<12}{m.mode:<7}{m.ms:>10.1f}{m.images_per_second:>9.2f}"
            f"{m.ratio:>9.2f}x{m.best_ratio:>15.2f}x"
        )
    return "\n".join(lines)


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
    """Runs `modsquad benchmark <what>`: prints its table(s) (and writes `--json`); returns the exit status."""
    if args.what == "memory":
        return run_memory(args)
    if args.what == "samplers":
        return run_samplers(args)
    _check_args(args)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    if args.what == "moe":
        modes = (
            "fwd: inference (no graph); fwd+bwd: training step of the layer (router included, input gradient "
            "included)"
        )
    else:
        modes = (
            "fwd: inference (no graph); fwd+bwd: forward, loss, backward; train: fwd+bwd and an AdamW step; "
            "img/s per model"
        )
    print(
        f"torch {torch.__version__}, {where}, {args.dtype}; medians of {args.repeats} interleaved repeats after "
        f"{args.warmup} warm-up rounds. {modes}. Load average at start: {_load_average()}"
    )
    report = []
    for name in args.cases:
        if args.what == "moe":
            case = CASES[name]
            measurements = measure_case(
                case,
                args.implementations,
                args.repeats,
                args.warmup,
                args.max_gather_gb,
                args.seed,
                device=device,
                dtype=dtype,
            )
            table, facts = format_table(case, measurements), {}
        else:
            case = MODEL_CASES[name]
            if args.batch_size is not None:
                case = dataclasses.replace(case, batch=args.batch_size)
            measurements, facts = measure_model_case(
                case,
                args.implementations,
                args.repeats,
                args.warmup,
                args.seed,
                device=device,
                dtype=dtype,
                modes=args.modes,
            )
            table = format_model_table(case, measurements, facts)
        print()
        print(table)
        report.append({"case": asdict(case), "measurements": [asdict(m) for m in measurements], **facts})
    print(f"\nload average at end: {_load_average()}")
    if args.json:
        summary = {
            "what": args.what,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device),
            "dtype": args.dtype,
            "cases": report,
        }
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------------- memory benchmark
MEMORY_TASKS = [
    {"name": "cls", "type": "image-classification", "num_labels": 1000},
    {"name": "det", "type": "object-detection", "num_labels": 80, "head_channels": 128},
    {"name": "seg", "type": "semantic-segmentation", "num_labels": 150, "decoder_channels": 256},
    {"name": "depth", "type": "depth-estimation", "decoder_channels": 256},
]


@dataclass(frozen=True)
class MemoryCase:
    """A multi-task step to measure: one batch of `batch_size` images of `image_size` pixels for each of the four
    `MEMORY_TASKS` (ImageNet-, COCO-, ADE20K- and NYU-like heads), through a ViT whose odd blocks are MoE."""

    name: str
    hidden: int
    layers: int
    heads: int
    patch: int
    image_size: int
    num_experts: int
    expert_intermediate_size: int
    top_k: int
    batch_size: int

    def describe(self) -> str:
        return (
            f"{len(MEMORY_TASKS)} tasks x {self.batch_size} images of {self.image_size}px, ViT {self.hidden} wide, "
            f"{self.layers} blocks, {self.heads} heads, {self.patch}px patches, odd blocks {self.num_experts} experts "
            f"of {self.expert_intermediate_size} (top-{self.top_k})"
        )

    def config(self) -> ModSquadConfig:
        return ModSquadConfig(
            tasks=[dict(task) for task in MEMORY_TASKS],
            hidden_size=self.hidden,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            patch_size=self.patch,
            image_size=self.image_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.top_k,
            expert_intermediate_size=self.expert_intermediate_size,
            moe_layers="every_other",
        )


MEMORY_CASES = {
    # Mod-Squad-B: ViT-B/16 at 224px, 16 MLP experts of 768 (top-4: the active width of ViT-B's 3072 MLP).
    "vit-b16": MemoryCase("vit-b16", 768, 12, 12, 16, 224, 16, 768, 4, 8),
    "tiny": MemoryCase("tiny", 64, 4, 4, 8, 64, 4, 64, 2, 4),
}


def synthetic_task_batch(task: dict, batch_size: int, image_size: int, generator: torch.Generator) -> dict:
    """Random images and labels in the format of `task`'s head (what its collator would produce)."""
    pixel_values = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    task_type = task["type"]
    if task_type == "image-classification":
        labels = torch.randint(0, task["num_labels"], (batch_size,), generator=generator)
    elif task_type == "semantic-segmentation":
        labels = torch.randint(
            0, task["num_labels"], (batch_size, image_size, image_size), generator=generator
        )
    elif task_type == "depth-estimation":
        labels = 0.5 + 5 * torch.rand(batch_size, image_size, image_size, generator=generator)
    elif task_type == "object-detection":
        labels = []
        for _ in range(batch_size):
            centres = 0.25 + 0.5 * torch.rand(3, 2, generator=generator)
            sizes = 0.1 + 0.2 * torch.rand(3, 2, generator=generator)
            classes = torch.randint(0, task["num_labels"], (3,), generator=generator)
            labels.append({"class_labels": classes, "boxes": torch.cat((centres, sizes), dim=1)})
    else:
        raise ValueError(
            f"no synthetic labels for task type {task_type!r}; accepted: {[t['type'] for t in MEMORY_TASKS]}"
        )
    return {"pixel_values": pixel_values, "labels": labels}


def measure_memory(case: MemoryCase, per_task: bool = True, seed: int = 0) -> dict[str, Any]:
    """Allocator peaks of one step of `case`: one graph, one task at a time, and (`per_task`) each task alone.

    Returns:
        `dict` with `parameters_bytes`, `gradients_bytes`, `rows` (`[{"mode", "peak_bytes", "end_bytes"}]`) and
        `ratio` (one task at a time / one graph).
    """
    from ..model.modeling_multitask import ModSquadForMultiTask
    from ..training.memory import step_peak_memory

    torch.manual_seed(seed)
    model = ModSquadForMultiTask(case.config()).train()
    generator = torch.Generator().manual_seed(seed + 1)
    tasks = case.config().tasks
    step = [(t["name"], synthetic_task_batch(t, case.batch_size, case.image_size, generator)) for t in tasks]
    # First calls allocate lazily (kernel workspaces, caches): warm up on a tiny step, outside the measurements.
    warmup = [(t["name"], synthetic_task_batch(t, 1, case.image_size, generator)) for t in tasks]
    step_peak_memory(model, warmup, one_task_at_a_time=True)

    rows = []
    for mode, micro_batches, one_at_a_time in (
        ("one graph, all tasks", step, False),
        ("one task at a time", step, True),
        *((f"{task} alone", [(task, b)], False) for task, b in (step if per_task else [])),
    ):
        peak = step_peak_memory(model, micro_batches, one_at_a_time)
        rows.append({"mode": mode, "peak_bytes": peak.peak_bytes, "end_bytes": peak.end_bytes})
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "case": asdict(case),
        "parameters_bytes": parameter_bytes,
        "gradients_bytes": parameter_bytes,
        "rows": rows,
        "ratio": rows[1]["peak_bytes"] / rows[0]["peak_bytes"],
    }


def format_memory_table(case: MemoryCase, result: dict[str, Any]) -> str:
    """Plain-text table of [`measure_memory`]'s peaks, in MiB, relative to the one-graph step."""
    mib = 2**20
    base = result["rows"][0]["peak_bytes"]
    lines = [
        f"memory case {case.name}: {case.describe()}",
        f"  parameters: {result['parameters_bytes'] / mib:.0f} MiB (fp32; their gradients, made in the step, as much)",
        f"  {'step':<24}{'peak MiB':>10}{'x one graph':>13}{'alive after MiB':>17}",
    ]
    lines.append("  " + "-" * (len(lines[-1]) - 2))
    for row in result["rows"]:
        lines.append(
            f"  {row['mode']:<24}{row['peak_bytes'] / mib:>10.0f}{row['peak_bytes'] / base:>12.2f}x"
            f"{row['end_bytes'] / mib:>17.0f}"
        )
    return "\n".join(lines)


def run_memory(args: argparse.Namespace) -> int:
    """Runs `modsquad benchmark memory`: prints the table (and writes `--json`)."""
    torch.set_num_threads(args.threads)
    case = MEMORY_CASES[args.memory_case]
    print(
        f"torch {torch.__version__}, fp32, CPU. Peak = the CPU allocator's most bytes alive at once during the "
        "step's forward and backward, above what existed before (parameters); read from torch.profiler's memory "
        "events (see modsquad.training.memory)."
    )
    result = measure_memory(case, per_task=args.per_task, seed=args.seed)
    print()
    print(format_memory_table(case, result))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "memory": result}, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------- sampler benchmark
SAMPLER_TASKS = ("cls", "det", "seg", "depth")
# Unequal training sets, so that the strategies differ: proportional draws cls ~70 % of the time, depth ~4 %.
DEFAULT_SAMPLER_SIZES = (1024, 256, 128, 64)
SAMPLER_BATCH_SIZE = 16


def add_sampler_arguments(group: argparse._ArgumentGroup) -> None:
    """Arguments of `modsquad benchmark samplers`."""
    group.add_argument(
        "--output-dir", default="runs/benchmark-samplers", help="one run folder per strategy and estimator; "
        "finished runs are read back, not trained again (default runs/benchmark-samplers)",
    )  # fmt: skip
    group.add_argument(
        "--steps", type=int, default=800, help="steps of the simt runs (default 800, the demo's)"
    )
    group.add_argument(
        "--sizes", type=int, nargs=len(SAMPLER_TASKS), default=list(DEFAULT_SAMPLER_SIZES), metavar="N",
        help=f"training images of {' '.join(SAMPLER_TASKS)} (default {' '.join(map(str, DEFAULT_SAMPLER_SIZES))})",
    )  # fmt: skip
    group.add_argument(
        "--tasks-per-step", type=int, default=len(SAMPLER_TASKS),
        help="micro-batches per step of the sampling strategies (default: one per task, as simt)",
    )  # fmt: skip
    group.add_argument(
        "--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES), metavar="NAME"
    )
    group.add_argument(
        "--estimators", nargs="+", choices=MI_ESTIMATORS, default=list(MI_ESTIMATORS), metavar="NAME"
    )
    group.add_argument("--num-val", type=int, default=64, help="validation images per task (default 64)")
    group.add_argument(
        "--sampler-overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="recipe overrides for every run",
    )


def sampler_recipe(
    strategy: str,
    estimator: str,
    output_dir: str | Path,
    steps: int = 800,
    sizes: tuple[int, ...] = DEFAULT_SAMPLER_SIZES,
    tasks_per_step: int = len(SAMPLER_TASKS),
    num_val: int = 64,
    overrides: list[str] | None = None,
) -> TrainingRecipe:
    """The demo recipe with unequal training sets, every task at batch size `SAMPLER_BATCH_SIZE`, trained with
    `strategy` and the `estimator` MI statistics for as many images as `steps` simt steps see.

    Every micro-batch holds the same number of images, so equal images seen is equal micro-batches: a sampling
    strategy drawing `tasks_per_step` micro-batches per step runs `steps * num_tasks / tasks_per_step` steps (warm-up
    scaled alike).
    """
    from .demo import demo_recipe

    num_tasks = len(SAMPLER_TASKS)
    scale = 1.0 if strategy == "simt" else num_tasks / tasks_per_step
    recipe_overrides = [
        f"mixing.strategy={strategy}",
        f"optimization.mi_estimator={estimator}",
        f"training.max_steps={max(1, round(steps * scale))}",
        f"optimization.warmup_steps={round(min(30, steps // 10) * scale)}",
        "training.save_final_model=false",
        "training.tracker=none",
    ]
    if strategy != "simt":
        recipe_overrides.append(f"mixing.tasks_per_step={tasks_per_step}")
    for name, size in zip(SAMPLER_TASKS, sizes):
        recipe_overrides += [
            f"tasks.{name}.dataset.num_train={size}",
            f"tasks.{name}.batch_size={SAMPLER_BATCH_SIZE}",
        ]
    return demo_recipe(
        output_dir, num_val=num_val, max_steps=steps, overrides=[*recipe_overrides, *(overrides or [])]
    )


def validation_mutual_information(model: torch.nn.Module, tasks: list) -> list[float]:
    """Per router, `I(T;E)` in nats of the tasks' mean router distributions on their validation images (no
    augmentation), every task weighing the same: a sampler-independent measure of specialisation."""
    from ..model.moe import task_expert_mutual_information
    from ..pruning.run import calibration_loader
    from ..pruning.usage import pixel_batches

    config = model.config
    rows: list[list[torch.Tensor]] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for task in tasks:
            loader = calibration_loader(
                config.get_task(task.name), task.processor, task.eval_dataset, samples=len(task.eval_dataset),
                batch_size=32, columns=task.eval_columns, schema_options=task.eval_options,
            )  # fmt: skip
            sums, tokens = None, 0
            for pixels in pixel_batches(loader, config, task.name):
                out = model.modsquad(pixel_values=pixels, task=task.name, output_router_logits=True)
                batch_sums = [p.float().sum(dim=0) for p in out.router_probs]
                sums = batch_sums if sums is None else [a + b for a, b in zip(sums, batch_sums)]
                tokens += out.router_probs[0].shape[0]
            rows.append([total / tokens for total in sums])
    model.train(was_training)
    return [float(task_expert_mutual_information(torch.stack(per_router))) for per_router in zip(*rows)]


def run_sampler_case(recipe: TrainingRecipe) -> dict[str, Any]:
    """Trains `recipe` (or reads its finished `sampler_result.json`) and returns metrics and MI per router."""
    from ..training.task_data import build_model, build_task_data
    from ..training.trainer import build_mixer, train
    from .demo import headline_metric, router_names

    output_dir = Path(recipe.output_dir)
    saved = output_dir / "sampler_result.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    tasks, processor = build_task_data(recipe)
    model = build_model(recipe, tasks)
    result = train(recipe, model, tasks, processor)
    if result.interrupted is not None:
        raise RuntimeError(
            f"the {output_dir} run was interrupted at step {result.step}; run the command again"
        )
    task_types = {entry["name"]: entry["type"] for entry in result.model.config.tasks}
    mixer = build_mixer(recipe, tasks, num_processes=1, process_index=0)
    draws = [mixer.tasks_for_step(step) for step in range(result.step)]
    summary = {
        "strategy": recipe.mixing.strategy,
        "estimator": recipe.optimization.mi_estimator,
        "steps": result.step,
        "metrics": {
            name: {
                "metric": headline_metric(task_types[name]),
                "value": values.get(headline_metric(task_types[name])),
            }
            for name, values in result.metrics.items()
        },
        "routers": router_names(result.model.config),
        "mutual_information": validation_mutual_information(result.model, tasks),
        "micro_batches": dict(Counter(task for draw in draws for task in draw)),
        "single_task_steps": sum(len(set(draw)) == 1 for draw in draws) / len(draws),
    }
    saved.write_text(json.dumps(summary, indent=2))
    return summary


def format_sampler_table(results: list[dict[str, Any]]) -> str:
    """Metrics per task and validation `I(T;E)` per router of every run; MI also relative to the simt runs."""
    reference = {r["estimator"]: sum(r["mutual_information"]) for r in results if r["strategy"] == "simt"}
    simt_step = reference.get("step")
    tasks = list(results[0]["metrics"])
    routers = results[0]["routers"]
    header = f"{'strategy':<13}{'MI estimator':<14}{'steps':>6}{'1-task steps':>14}"
    header += "".join(f"{t + ' ' + results[0]['metrics'][t]['metric']:>22}" for t in tasks)
    header += "".join(f"{'I ' + r:>14}" for r in routers) + f"{'I total':>9}{'/ simt(step)':>14}"
    lines = [header, "-" * len(header)]
    for r in results:
        line = f"{r['strategy']:<13}{r['estimator']:<14}{r['steps']:>6}{r['single_task_steps']:>14.0%}"
        line += "".join(f"{r['metrics'][t]['value']:>22.3f}" for t in tasks)
        line += "".join(f"{mi:>14.3f}" for mi in r["mutual_information"])
        total = sum(r["mutual_information"])
        line += f"{total:>9.3f}" + (f"{total / simt_step:>13.0%}" if simt_step else f"{'':>14}")
        lines.append(line)
    return "\n".join(lines)


def run_samplers(args: argparse.Namespace) -> int:
    """Runs `modsquad benchmark samplers`: trains (or reads back) every run and prints the table."""
    torch.set_num_threads(args.threads)
    print(
        "Demo data with training sets of "
        + ", ".join(f"{t} {n}" for t, n in zip(SAMPLER_TASKS, args.sizes))
        + f" images, batch {SAMPLER_BATCH_SIZE} per micro-batch; simt: {args.steps} steps of {len(SAMPLER_TASKS)} "
        f"micro-batches, sampling strategies: {args.tasks_per_step} micro-batches per step, as many images in all. "
        "I(T;E): per MoE router, of the tasks' mean router distributions on validation images, tasks weighted "
        "equally (nats; the most is ln 4 = 1.386)."
    )
    results = []
    for strategy in args.strategies:
        for estimator in args.estimators:
            recipe = sampler_recipe(
                strategy, estimator, Path(args.output_dir) / f"{strategy}-{estimator}", args.steps, tuple(args.sizes),
                args.tasks_per_step, args.num_val, args.sampler_overrides,
            )  # fmt: skip
            print(
                f"\n{strategy} / {estimator}: {recipe.training.max_steps} steps -> {recipe.output_dir}",
                flush=True,
            )
            results.append(run_sampler_case(recipe))
    print()
    print(format_sampler_table(results))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"samplers": results}, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


__all__ = [
    "CASES",
    "IMPLEMENTATIONS",
    "MEMORY_CASES",
    "MODEL_CASES",
    "Measurement",
    "MemoryCase",
    "MoECase",
    "ModelCase",
    "ModelMeasurement",
    "add_arguments",
    "add_sampler_arguments",
    "build_layers",
    "build_models",
    "format_memory_table",
    "format_model_table",
    "format_sampler_table",
    "format_table",
    "interleaved_samples",
    "measure_case",
    "measure_memory",
    "measure_model_case",
    "run",
    "run_memory",
    "run_samplers",
    "sampler_recipe",
    "skip_reason",
    "synthetic_task_batch",
    "validation_mutual_information",
]
