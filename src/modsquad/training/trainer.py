"""Heterogeneous multi-task training with 🤗 Accelerate.

`train(recipe)` is the whole loop, in the style of Accelerate's examples: `prepare`, `accumulate`, `backward`,
`clip_grad_norm_`, `save_state` all appear in one function. One optimizer step is `gradient_accumulation_steps`
multi-task micro-steps; one micro-step is ONE forward of a [`MultiTaskStep`] over every task micro-batch the mixer
gives (all tasks under `simt`), then ONE backward of weighted task losses + auxiliary losses + the mutual-information
loss, whose routing statistics are all-reduced across processes. With the per-step estimator the MI window is one
micro-step (accumulation adds independent micro-steps); with the streaming one (`optimization.mi_estimator:
streaming`) it spans recent steps, and `training.one_task_at_a_time` runs one forward and backward per task
micro-batch instead (DDP reduces gradients in the last backward of the optimizer step only).

After the first steps the loop prints how long training has left; with a time budget (`training.max_minutes`,
`--max-minutes`) it fits the learning-rate schedule to the steps that fit and stops at the budget, decided on the
main process and shared in the per-step all-reduce (see `budget.py`).

Run it with `modsquad train --config recipe.yaml` or `accelerate launch training/train.py --config recipe.yaml`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    gather_object,
    is_npu_available,
    is_xpu_available,
    send_to_device,
    set_seed,
)
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..data.batching import BadRowError
from ..data.mixing import MultiTaskMixer, StreamingTaskStream, TaskStream
from ..model.modeling_multitask import ModSquadForMultiTask
from ..run_folder import (
    EMA_USAGE_FILE,
    EVAL_RESULTS_FILE,
    FINAL_DIR,
    LOGS_DIR,
    LOSS_WEIGHTS_FILE,
    RECIPE_FILE,
    REPLICA_DIGESTS_FILE,
    TRAINING_LOG,
)
from .budget import ESTIMATE_AFTER_STEPS, StepClock, TimeEstimate
from .checkpointing import (
    CheckpointedState,
    StopOnSignal,
    check_run_folder,
    checkpoint_path,
    clear_run,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from .param_groups import group_learning_rates, learning_rate_groups
from .recipe import TrainingRecipe
from .step import (
    MultiTaskStep,
    MultiTaskStepOutput,
    StreamingRoutingStatistics,
    TaskLossWeighting,
    merge_step_outputs,
)
from .task_data import TaskData
from .tracking import CSVTracker, trackers_to_log_with


@dataclass
class TrainResult:
    r"""
    What a training run leaves behind.

    Args:
        output_dir (`Path`): the run folder.
        step (`int`): optimizer steps done.
        max_steps (`int`): optimizer steps planned (the recipe's).
        interrupted (`int`, *optional*): the signal that stopped the run early (a checkpoint was saved).
        metrics (`dict[str, dict[str, float]]`): last evaluation, per task.
        history (`list[dict]`): the training-log lines written by this process's run (main process).
        final_dir (`Path`, *optional*): `save_pretrained` folder of the final model (and processor).
        checkpoint (`Path`, *optional*): the last checkpoint written.
        model ([`ModSquadForMultiTask`], *optional*): the trained model (unwrapped), on this process.
        replica_digests (`list[str]`): SHA-256 of every process's parameters after training (all equal when the
            replicas stayed in sync; one entry for a single process).
        out_of_time (`bool`): training ended before `max_steps` at the `training.max_minutes` budget; the run
            was finished as usual (evaluation, final model) after `step` steps.
    """

    output_dir: Path
    step: int
    max_steps: int
    interrupted: int | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    final_dir: Path | None = None
    checkpoint: Path | None = None
    model: ModSquadForMultiTask | None = None
    replica_digests: list[str] = field(default_factory=list)
    out_of_time: bool = False


class TrainingDivergedError(ValueError):
    """The training loss became NaN or infinite (outside fp16's skipped steps); the message names the step, the task
    losses and the last checkpoint."""


class TrainerState:
    """Loop state saved in checkpoints next to Accelerate's own: the optimizer step and the per-task EMA of expert
    usage (fraction of each task's top-k selections that went to each expert, per router), all-reduced over
    processes before it is averaged in (the pruning of experts reads it)."""

    def __init__(self, num_tasks: int, decay: float):
        self.step = 0
        self.decay = decay
        self.num_tasks = num_tasks
        self.usage_ema: list[torch.Tensor] | None = None  # per router: (num_tasks, num_experts)
        self.usage_seen = torch.zeros(num_tasks, dtype=torch.bool)
        self.bad_rows: dict[
            str, int
        ] = {}  # per task: training rows skipped on this process (see `note_bad_rows`)

    def update_usage(self, counts: list[torch.Tensor]) -> None:
        if self.usage_ema is None:
            self.usage_ema = [torch.zeros_like(c, dtype=torch.float32, device="cpu") for c in counts]
        for ema, count in zip(self.usage_ema, counts):
            count = count.float().cpu()
            totals = count.sum(dim=1, keepdim=True)
            fraction = count / totals.clamp_min(1.0)
            present = totals.squeeze(1) > 0
            # A task's first observation initialises its row; later ones are averaged in.
            first = present & ~self.usage_seen
            ema[first] = fraction[first]
            later = present & self.usage_seen
            ema[later] = self.decay * ema[later] + (1 - self.decay) * fraction[later]
        self.usage_seen |= torch.stack([c.sum(dim=1) > 0 for c in counts]).any(dim=0).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "usage_ema": self.usage_ema,
            "usage_seen": self.usage_seen,
            "bad_rows": dict(self.bad_rows),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.usage_ema = state["usage_ema"]
        self.usage_seen = state["usage_seen"]
        self.bad_rows = dict(state.get("bad_rows", {}))

    def note_bad_rows(
        self, micro_batches: list[tuple[str, dict]], max_bad_rows: int, process: str = ""
    ) -> None:
        """Takes the `skipped_rows` the loaders reported out of the step's batches, warns about each (naming the
        task, the row and why) and raises once a task has skipped more than `max_bad_rows` rows."""
        for task, batch in micro_batches:
            skipped = batch.pop("skipped_rows", None) if isinstance(batch, dict) else None
            for _, reason in skipped or ():
                self.bad_rows[task] = self.bad_rows.get(task, 0) + 1
                print(
                    f"warning{process}: skipped a bad training row ({reason}); replaced by the next good row",
                    file=sys.stderr,
                    flush=True,
                )
                if self.bad_rows[task] > max_bad_rows:
                    raise BadRowError(
                        f"task {task!r} has skipped {self.bad_rows[task]} bad training rows, more than "
                        f"training.max_bad_rows={max_bad_rows}; the last: {reason}"
                    )


class StepSums:
    """What the micro-steps of one optimizer step report, summed for one all-reduce at the end of the step.

    Args:
        num_micro_steps (`int`): micro-steps over all processes (`num_processes * gradient_accumulation_steps`).
    """

    def __init__(self, num_micro_steps: int):
        self.num_micro_steps = num_micro_steps
        self.sums: torch.Tensor | None = None
        self.expert_shapes: list[torch.Size] = []
        self.num_tasks = 0
        self.grad_norm: torch.Tensor | float | None = None

    def add(self, out: MultiTaskStepOutput, objective: torch.Tensor) -> None:
        counts = list(out.expert_counts or ())
        self.expert_shapes = [c.shape for c in counts]
        self.num_tasks = out.task_losses.numel()
        flat = torch.cat(
            [objective.float().view(1), out.aux_loss.float().view(1), out.mi_loss.float().view(1),
             out.task_losses.float(), out.task_counts.float(), *[c.float().reshape(-1) for c in counts]]
        )  # fmt: skip
        self.sums = flat if self.sums is None else self.sums + flat

    def reduce(
        self,
        accelerator: Accelerator,
        stop_requested: bool,
        out_of_time: bool = False,
        planned_steps: int = 0,
    ) -> tuple[bool, dict[str, Any]]:
        """Sums over processes. Returns whether any process asked to stop, and the step's mean `loss`, `aux_loss`,
        `mi_loss`, per-task mean `task_losses` (`None` for tasks absent from the step) and expert-usage counts.

        The time budget's decisions are the main process's alone (the other processes pass `False` and 0), shared
        through the same sum: `out_of_time` (stop after this step) and `planned_steps` (0: no new plan)."""
        flags = [1.0 if stop_requested else 0.0, 1.0 if out_of_time else 0.0, float(planned_steps)]
        flags = torch.tensor(flags, device=self.sums.device)
        totals = accelerator.reduce(torch.cat([flags, self.sums]), reduction="sum").cpu()
        stop, budget = (
            bool(totals[0] > 0),
            {"out_of_time": bool(totals[1] > 0), "planned_steps": int(totals[2])},
        )
        totals = totals[3:]
        t = self.num_tasks
        losses, counts = totals[3 : 3 + t], totals[3 + t : 3 + 2 * t]
        usage, offset = [], 3 + 2 * t
        for shape in self.expert_shapes:
            size = int(torch.Size(shape).numel())
            usage.append(totals[offset : offset + size].view(shape))
            offset += size
        n = self.num_micro_steps
        return stop, {
            "loss": totals[0].item() / n,
            "aux_loss": totals[1].item() / n,
            "mi_loss": totals[2].item() / n,
            "task_losses": [(loss / c).item() if c > 0 else None for loss, c in zip(losses, counts)],
            "usage": usage,
            **budget,
        }


# ----------------------------------------------------------------------------------------------- building blocks
class WarmupCosineSchedule(LambdaLR):
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak at `total_steps`.

    [`fit`] moves the end of the cosine while training (a time budget that holds fewer steps). The plan is not part
    of the saved state: a resumed run plans from its own recipe and budget.
    """

    _PLAN = ("warmup_steps", "total_steps", "min_lr_ratio")

    def __init__(
        self, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
    ):
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def fit(self, total_steps: int) -> None:
        """Ends the cosine at `total_steps` instead, from the current step on. The warm-up is kept (changing it
        would make the learning rate jump), so the end never moves into it."""
        self.total_steps = max(total_steps, self.warmup_steps + 1)
        # Re-evaluate the current learning rate under the new plan (a no-op while warming up).
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for key in self._PLAN:
            state.pop(key, None)
        return state


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> WarmupCosineSchedule:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak at `total_steps`
    (a [`WarmupCosineSchedule`])."""
    return WarmupCosineSchedule(optimizer, warmup_steps, total_steps, min_lr_ratio)


def build_optimizer(
    module: torch.nn.Module,
    learning_rate: float,
    weight_decay: float,
    betas,
    backbone_learning_rate: float | None = None,
    layer_decay: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over `learning_rate_groups`: weight decay on matrices (experts, projections, routers), none on
    `NO_DECAY` names; with `backbone_learning_rate` / `layer_decay`, a lower (layer-decayed) learning rate for the
    pretrained backbone than for the new heads, routers and task tokens. Each group's `name` says which it is."""
    groups = learning_rate_groups(module, learning_rate, weight_decay, backbone_learning_rate, layer_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas))


def describe_groups(optimizer: torch.optim.Optimizer) -> list[str]:
    """One line per named learning-rate group: its name, peak learning rate and parameter count."""
    counts: dict[str, list] = {}
    for group in optimizer.param_groups:
        entry = counts.setdefault(group["name"], [group["lr"], 0])
        entry[1] += sum(p.numel() for p in group["params"])
    return [f"  {name}: lr {lr:.3g}, {count:,} parameters" for name, (lr, count) in counts.items()]


def use_cpu(requested: bool) -> bool:
    """Whether to train on the CPU: when asked, and when a launcher started several processes on a machine without
    an accelerator (Accelerate joins CPU processes into one gloo group only when told `cpu=True`; otherwise each
    process would silently train alone)."""
    if requested:
        return True
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return launched and not (torch.cuda.is_available() or is_xpu_available() or is_npu_available())


# Where `accelerate launch` (its flags, or the `accelerate config` file it reads) leaves its settings for the script.
LAUNCHER_MIXED_PRECISION = "ACCELERATE_MIXED_PRECISION"
LAUNCHER_GRADIENT_ACCUMULATION = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"


def resolve_mixed_precision(requested: str | None, cpu: bool) -> str | None:
    """The `mixed_precision` to hand to `Accelerator`.

    A recipe's explicit choice wins; `"auto"` is bf16 on GPUs that support it, fp16 on other GPUs, `"no"` on CPU.
    Unset (`None`): under a launcher, `None`, so that Accelerate applies the launcher's setting
    (`accelerate launch --mixed_precision bf16` or the `accelerate config` file); without one, `"auto"`.
    """
    if requested is None:
        if os.environ.get(LAUNCHER_MIXED_PRECISION):
            return None
        requested = "auto"
    if requested != "auto":
        return requested
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def resolve_gradient_accumulation(requested: int | None) -> int:
    """The recipe's micro-steps per optimizer step when it sets them, else the launcher's
    (`accelerate launch --gradient_accumulation_steps N`), else 1."""
    if requested is not None:
        return requested
    value = os.environ.get(LAUNCHER_GRADIENT_ACCUMULATION, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{LAUNCHER_GRADIENT_ACCUMULATION}={value!r} must be a positive int")
    return int(value)


def build_accelerator(recipe: TrainingRecipe, model: ModSquadForMultiTask | None = None) -> Accelerator:
    """The run's `Accelerator`. Settings the recipe leaves unset (mixed precision, gradient accumulation, the
    device) are Accelerate's own: what `accelerate launch` flags or `accelerate config` say. `model` (the model to
    train) decides DDP's `find_unused_parameters` when the recipe leaves it unset."""
    loop = recipe.training
    output_dir = Path(recipe.output_dir)
    cpu = use_cpu(loop.cpu)
    find_unused = loop.find_unused_parameters
    if find_unused is None:
        # Sampling strategies may leave a task, hence its head, out of a step; one task graph at a time leaves every
        # other head out of each forward; and when every head is a dense one that reads intermediate blocks only,
        # the backbone's final norm is never used: let DDP skip them.
        final_norm_unused = model is not None and not any(
            not head.hidden_state_indices or model.config.num_hidden_layers - 1 in model.config.feature_layers
            for head in model.heads.values()
        )
        find_unused = recipe.mixing.strategy != "simt" or loop.one_task_at_a_time or final_norm_unused
    return Accelerator(
        cpu=cpu,
        mixed_precision=resolve_mixed_precision(loop.mixed_precision, cpu),
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=resolve_gradient_accumulation(loop.gradient_accumulation_steps),
            sync_with_dataloader=False,
        ),
        log_with=trackers_to_log_with(loop.tracker),
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_DIR)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )


def build_mixer(
    recipe: TrainingRecipe, tasks: list[TaskData], num_processes: int, process_index: int
) -> MultiTaskMixer:
    """One sharded [`TaskStream`] per task ([`StreamingTaskStream`] for streamed data), mixed by the recipe's
    strategy."""
    sharding = {"seed": recipe.seed, "num_replicas": num_processes, "rank": process_index}
    streams: dict[str, TaskStream | StreamingTaskStream] = {}
    for index, task in enumerate(tasks):
        if task.is_streamed:
            streams[task.name] = StreamingTaskStream(
                task.train_dataset,
                task.batch_size,
                task.make_loader,
                num_rows=task.num_train_rows,
                task_index=index,
                **sharding,
            )
        else:
            streams[task.name] = TaskStream(
                len(task.train_dataset), task.batch_size, task.make_loader, task_index=index, **sharding
            )
    return MultiTaskMixer(
        streams,
        strategy=recipe.mixing.strategy,
        temperature=recipe.mixing.temperature,
        tasks_per_step=recipe.mixing.tasks_per_step,
        seed=recipe.seed,
    )


def steps_for_epochs(mixer: MultiTaskMixer, num_epochs: float, accumulation: int) -> int:
    """Optimizer steps of `num_epochs` mixer epochs; a ValueError when a streamed task has no length to count
    epochs by."""
    if mixer.steps_per_epoch is None:
        endless = [name for name, s in mixer.streams.items() if s.batches_per_epoch is None]
        raise ValueError(
            f"the streamed tasks {endless} have no known number of rows, so epochs cannot be counted: set "
            "training.max_steps, or declare each one's rows (tasks.<name>.num_train_rows)"
        )
    return max(1, math.ceil(num_epochs * mixer.steps_per_epoch / accumulation))


def evaluate_tasks(model: ModSquadForMultiTask, tasks: list[TaskData], accelerator: Accelerator) -> dict:
    """`evaluate_model` on every task that has evaluation data (call on the main process only)."""
    from ..metrics.evaluation import evaluate_model

    was_training = model.training
    model.eval()
    results = {}
    with accelerator.autocast():
        for task in tasks:
            if task.eval_dataset is None:
                continue
            results[task.name] = evaluate_model(
                model,
                task.processor,
                task.eval_dataset,
                task=task.name,
                **task.evaluation_kwargs(),
            )
    model.train(was_training)
    return results


def forward_backward(
    accelerator: Accelerator,
    step_module: torch.nn.Module,
    micro_batches: list[tuple[str, Any]],
    one_task_at_a_time: bool = False,
) -> MultiTaskStepOutput:
    """The forward and backward of one micro-step: one graph over every task micro-batch, or one per micro-batch.

    One task at a time, DDP must not reduce gradients after each task's backward: all backward passes but the last
    run under `no_sync` (inside `accelerator.accumulate`, which already suppresses the reduction of every micro-step
    but the last of an optimizer step), so gradients accumulate locally and are reduced once.

    Args:
        accelerator (`Accelerator`): the run's accelerator.
        step_module: the prepared [`MultiTaskStep`].
        micro_batches (`list[tuple[str, Any]]`): `(task, batch)` pairs of the micro-step, on the device.
        one_task_at_a_time (`bool`, *optional*, defaults to `False`): one forward and backward per micro-batch (the
            step module must use the streaming estimator).

    Returns:
        [`MultiTaskStepOutput`] of the micro-step (merged over its forwards, without `loss`, one task at a time).
    """
    if not one_task_at_a_time:
        out = step_module(micro_batches)
        accelerator.backward(out.loss)
        return out
    outputs = []
    for index, micro_batch in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(step_module):
            out = step_module([micro_batch])
            accelerator.backward(out.loss)
        out["loss"] = None  # the graph is spent; keep only the statistics
        outputs.append(out)
    return merge_step_outputs(outputs)


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# The data-parallel wrappers of this process's runs, never freed. Freeing one frees its reducer and with it the gloo
# process group, whose destructor joins gloo's worker threads while holding the GIL; a worker still destroying the
# last collectives (their tensors came from Python, so releasing them needs the GIL) then waits for it forever: a
# finished multi-process run hung now and then (py-spy: `~ProcessGroupGloo` joining a worker stuck in
# `~AsyncAllgatherWork`). Kept alive, the group is never torn down: the command line ends such a process with
# `os._exit` once everything is written (`modsquad.cli.exit_process`).
_LIVE_WRAPPERS: list[torch.nn.Module] = []


def end_training(accelerator: Accelerator) -> None:
    """`accelerator.end_training()` without its `destroy_process_group`: the trackers finish, and the process group
    stays up until the process ends (see `_LIVE_WRAPPERS`). Tearing gloo down right after the last collectives aborted one
    process of a finished 2-process run now and then (`terminate called without an active exception`)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def gather_parameter_digests(accelerator: Accelerator, module: torch.nn.Module) -> list[str]:
    """Every process's [`parameter_digest`] of `module`, in rank order."""
    digest = parameter_digest(module)
    if accelerator.num_processes == 1:
        return [digest]
    local = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=accelerator.device)
    gathered = [torch.empty_like(local) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(gathered, local)
    return [bytes(tensor.cpu().tolist()).hex() for tensor in gathered]


def next_micro_batches(
    accelerator: Accelerator, mixer: MultiTaskMixer, state: TrainerState, max_bad_rows: int, process_tag: str
) -> list[tuple[str, dict]]:
    """The next step's micro-batches, with their skipped rows counted (see [`TrainerState.note_bad_rows`]).

    Bad data stops one process only (its shard holds the bad rows), and the others would then wait for it in the
    step's collectives until the process group times out. With several processes, every process says whether its
    data failed (one small all-reduce) and all stop together: the failing one with its error, the others naming it.
    """
    error: Exception | None = None
    batches: list[tuple[str, dict]] = []
    try:
        batches = mixer.next_step()
        state.note_bad_rows(batches, max_bad_rows, process_tag)
    except (ValueError, OSError) as exc:  # BadRowError and the loaders' own checks
        error = exc
    if accelerator.num_processes > 1:
        flags = torch.zeros(accelerator.num_processes, device=accelerator.device)
        flags[accelerator.process_index] = 1.0 if error is not None else 0.0
        failed = accelerator.reduce(flags, reduction="sum").cpu()
        if error is None and bool(failed.any()):
            ranks = [rank for rank, flag in enumerate(failed.tolist()) if flag]
            raise BadRowError(
                f"the training data of process(es) {ranks} failed (see their error); stopping too"
            )
    if error is not None:
        raise error
    return batches


def _read_history(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if up_to_step is None or line["step"] <= up_to_step]


# ------------------------------------------------------------------------------------------------------ the loop
def train(
    recipe: TrainingRecipe,
    model: ModSquadForMultiTask,
    tasks: list[TaskData],
    processor: Any | None = None,
    on_estimate: Callable[[TimeEstimate], None] | None = None,
) -> TrainResult:
    """Trains a multi-task Mod-Squad model as the recipe says.

    The data and the model are built above the loop and handed to it, as in Accelerate's examples:
    `tasks, processor = build_task_data(recipe)` and `model = build_model(recipe, tasks)` (`training.task_data`).

    Args:
        recipe ([`TrainingRecipe`]): the run.
        model ([`ModSquadForMultiTask`]): the model to train (the same initial weights on every process).
        tasks (`list[TaskData]`): the data, in the model's task order.
        processor (*optional*): image processor saved with the final model.
        on_estimate (`Callable[[TimeEstimate], None]`, *optional*): called once on the main process after the
            first timed steps with the time-left [`TimeEstimate`] (e.g. to print one for a whole job); by default
            the loop prints its own line.

    Returns:
        [`TrainResult`].
    """
    loop, optim = recipe.training, recipe.optimization
    output_dir = Path(recipe.output_dir)
    accelerator = build_accelerator(recipe, model)
    set_seed(recipe.seed)  # the same data order and training noise on every process
    if [t.name for t in tasks] != model.config.task_names:
        raise ValueError(
            f"task data {[t.name for t in tasks]} must match the model's tasks {model.config.task_names}"
        )

    mixer = build_mixer(recipe, tasks, accelerator.num_processes, accelerator.process_index)
    accumulation = accelerator.gradient_accumulation_steps
    max_steps = loop.max_steps or steps_for_epochs(mixer, loop.num_epochs, accumulation)
    weighting = TaskLossWeighting(
        model.config.task_names, [t.loss_weight for t in tasks], optim.loss_weighting
    )
    routing_estimate = None
    if optim.mi_estimator == "streaming":
        # Micro-batches of each task per step on average (1 each under simt), what the estimator divides out.
        rates = [p * mixer.tasks_per_step for p in mixer.probabilities]
        routing_estimate = StreamingRoutingStatistics(model.config.num_tasks, optim.mi_horizon, rates)
    step_module = MultiTaskStep(
        model, weighting, world_size=accelerator.num_processes, routing_estimate=routing_estimate
    )
    optimizer = build_optimizer(
        step_module,
        optim.learning_rate,
        optim.weight_decay,
        optim.betas,
        optim.backbone_learning_rate,
        optim.layer_decay,
    )
    if len({group["name"] for group in optimizer.param_groups}) > 1:
        accelerator.print("\n".join(["learning-rate groups (peak):", *describe_groups(optimizer)]))
    warmup = max(optim.warmup_steps, int(optim.warmup_ratio * max_steps))
    # The schedule counts optimizer steps and is stepped by hand: a prepared scheduler would step once per process.
    scheduler = warmup_cosine_schedule(optimizer, warmup, max_steps, optim.min_lr_ratio)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    if accelerator.num_processes > 1:
        _LIVE_WRAPPERS.append(step_module)
    state = TrainerState(model.config.num_tasks, loop.usage_ema_decay)
    # The loop's own state goes to JSON / safetensors next to Accelerate's files (never to pickles); register more
    # objects here to checkpoint them too.
    loop_state = CheckpointedState()
    loop_state.register("trainer_state", state)
    loop_state.register("lr_scheduler", scheduler)
    loop_state.register("mixer", mixer)
    if routing_estimate is not None:
        # The streaming mutual-information estimate spans steps: without it a resumed run would restart it empty.
        loop_state.register("routing_estimate", routing_estimate)

    log_path = output_dir / TRAINING_LOG
    # Every process decides from the folder as it is, before anything is written to it.
    resume_from = check_run_folder(output_dir, recipe.resume, recipe.overwrite)
    if resume_from is not None:
        verify_checkpoint(resume_from, accelerator.num_processes, recipe.to_dict(), log=accelerator.print)
    accelerator.wait_for_everyone()
    if resume_from is not None:
        load_checkpoint(accelerator, resume_from, loop_state)
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    if accelerator.is_main_process:
        if recipe.overwrite:
            removed = clear_run(output_dir)
            if removed:
                accelerator.print(
                    f"--overwrite: deleted the earlier run's {', '.join(p.name for p in removed)}"
                )
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe.to_yaml(output_dir / RECIPE_FILE)
        # Steps after the checkpoint are trained again: forget what the interrupted run logged for them.
        kept = _read_history(log_path, state.step)
        log_path.write_text("".join(json.dumps(line) + "\n" for line in kept))
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        hparams = _flat_hparams(recipe, max_steps, mixer.steps_per_epoch)
        # What the run actually used, wherever it was decided (recipe, launcher, `accelerate config`).
        hparams.update(
            {
                "accelerate.mixed_precision": str(accelerator.mixed_precision),
                "accelerate.num_processes": accelerator.num_processes,
                "accelerate.gradient_accumulation_steps": accumulation,
                "accelerate.device": str(accelerator.device),
            }
        )
        accelerator.init_trackers("tracker", config=hparams)
        for tracker in accelerator.trackers:
            if isinstance(tracker, CSVTracker):
                tracker.drop_after(state.step)

    history: list[dict] = []
    metrics: dict[str, dict[str, float]] = {}
    # The steps this run will reach: `max_steps`, or fewer once the time budget has been fitted (see budget.py).
    planned_steps = max_steps
    clock = StepClock(loop.max_minutes, first_step=state.step)
    # After the first (untimed) step and ESTIMATE_AFTER_STEPS timed ones: the estimate and the budget's plan.
    estimate_step = state.step + 1 + ESTIMATE_AFTER_STEPS
    last_checkpoint: Path | None = resume_from
    task_names = model.config.task_names
    coef = model.config.mi_loss_coef

    def checkpoint() -> Path:
        # Each process's place in its share of a streamed task: a collective, so every process runs it; the main
        # process then saves them all with the mixer's state.
        mixer.gather_stream_states(gather_object)
        folder = save_checkpoint(
            accelerator,
            checkpoint_path(output_dir, state.step),
            loop_state,
            step=state.step,
            max_steps=max_steps,
            recipe=recipe.to_dict(),
        )
        if accelerator.is_main_process:
            prune_checkpoints(output_dir, loop.keep_last)
        accelerator.wait_for_everyone()
        return folder

    process_tag = f" [process {accelerator.process_index}]" if accelerator.num_processes > 1 else ""
    step_module.train()
    progress = tqdm(
        total=max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    started = time.perf_counter()
    with StopOnSignal() as stop:
        while state.step < planned_steps:
            sums = StepSums(accelerator.num_processes * accumulation)
            for _ in range(accumulation):
                micro_batches = next_micro_batches(accelerator, mixer, state, loop.max_bad_rows, process_tag)
                micro_batches = send_to_device(micro_batches, accelerator.device)
                with accelerator.accumulate(step_module):
                    out = forward_backward(accelerator, step_module, micro_batches, loop.one_task_at_a_time)
                    if accelerator.sync_gradients and optim.max_grad_norm:
                        sums.grad_norm = accelerator.clip_grad_norm_(
                            step_module.parameters(), optim.max_grad_norm
                        )
                    optimizer.step()
                    optimizer.zero_grad()
                # Report the loss as defined: MI at its coefficient, not the world-size-scaled term fed to backward.
                sums.add(out, out.weighted_loss + coef * out.mi_loss)
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.step += 1
            progress.update(1)
            clock.step_done(state.step)
            # The time budget is decided on the main process's clock alone, so that every process agrees.
            estimating = state.step == estimate_step and state.step < planned_steps
            plan = clock.steps_that_fit(max_steps) if estimating else 0
            main_out_of_time = accelerator.is_main_process and clock.out_of_time()

            # One all-reduce per step: losses, usage counts, the stop request and the budget travel together.
            stopped_anywhere, reduced = sums.reduce(
                accelerator,
                stop.requested is not None,
                out_of_time=main_out_of_time,
                planned_steps=plan if accelerator.is_main_process else 0,
            )
            if reduced["planned_steps"] and reduced["planned_steps"] < planned_steps:
                planned_steps = reduced["planned_steps"]
                scheduler.fit(planned_steps)  # the cosine now ends where the budget does
                progress.total = planned_steps
                progress.refresh()
            if estimating and accelerator.is_main_process:
                estimate = clock.estimate(planned_steps, max_steps)
                if on_estimate is not None:
                    on_estimate(estimate)
                else:
                    progress.write(estimate.describe())
            if reduced["out_of_time"]:
                planned_steps = min(
                    planned_steps, state.step
                )  # this step is the last; the run ends as finished
            # fp16's scaler skips steps with overflowing gradients by design; any other non-finite loss has already
            # spoilt the weights: stop (every process sees the same reduced loss) rather than train on NaN.
            if not math.isfinite(reduced["loss"]) and not accelerator.optimizer_step_was_skipped:
                losses = dict(zip(task_names, reduced["task_losses"]))
                raise TrainingDivergedError(
                    f"step {state.step}: the loss is {reduced['loss']} (task losses {losses}, aux "
                    f"{reduced['aux_loss']}); training diverged (learning rate, loss weights or data). The last "
                    f"checkpoint is {last_checkpoint or 'none'}"
                )
            # A signal during the last step changes nothing: the run is finishing anyway.
            stop_everywhere = stopped_anywhere and state.step < planned_steps
            if reduced["usage"]:
                state.update_usage(reduced["usage"])

            if state.step % loop.log_every == 0 or state.step == planned_steps or stop_everywhere:
                weights = accelerator.unwrap_model(step_module).weighting.effective_weights()
                line = {
                    "step": state.step,
                    **(
                        {"epoch": state.step * accumulation / mixer.steps_per_epoch}
                        if mixer.steps_per_epoch
                        else {}
                    ),
                    "lr": _base_learning_rate(optimizer, optim.learning_rate),
                    **_group_learning_rates(optimizer),
                    **{key: reduced[key] for key in ("loss", "aux_loss", "mi_loss")},
                    "time": time.perf_counter() - started,
                    **({"grad_norm": float(sums.grad_norm)} if sums.grad_norm is not None else {}),
                    **{
                        f"loss/{name}": value
                        for name, value in zip(task_names, reduced["task_losses"])
                        if value is not None
                    },
                    **{f"weight/{name}": value for name, value in weights.items()},
                }
                history.append(line)
                progress.set_postfix(loss=f"{line['loss']:.4f}", mi=f"{line['mi_loss']:.4f}")
                accelerator.log({f"train/{k}": v for k, v in line.items() if k != "step"}, step=state.step)
                if accelerator.is_main_process:
                    with log_path.open("a") as handle:
                        handle.write(json.dumps(line) + "\n")

            if loop.eval_every and state.step % loop.eval_every == 0 and state.step < planned_steps:
                if accelerator.is_main_process:
                    metrics = evaluate_tasks(accelerator.unwrap_model(step_module).model, tasks, accelerator)
                    accelerator.log(_flat_metrics(metrics), step=state.step)
                accelerator.wait_for_everyone()
            if stop_everywhere or (loop.save_every and state.step % loop.save_every == 0):
                last_checkpoint = checkpoint()
            if stop_everywhere:
                progress.close()
                accelerator.print(
                    f"stopped by signal {stop.requested or 'on another process'}; checkpoint {last_checkpoint}"
                )
                end_training(accelerator)
                return TrainResult(
                    output_dir, state.step, max_steps, stop.requested or -1, metrics, history,
                    checkpoint=last_checkpoint, model=accelerator.unwrap_model(step_module).model,
                )  # fmt: skip
    progress.close()
    if state.step < max_steps:
        accelerator.print(
            f"stopped at the {loop.max_minutes:g} min time budget after {state.step} of {max_steps} steps"
        )

    if loop.save_every and state.step % loop.save_every:
        last_checkpoint = checkpoint()
    final_dir = None
    unwrapped = accelerator.unwrap_model(step_module)
    # Data-parallel replicas must end bit-identical; checking costs one hash per process and catches silent desyncs.
    digests = gather_parameter_digests(accelerator, unwrapped)
    if len(set(digests)) > 1:
        raise RuntimeError(
            f"the {len(digests)} data-parallel replicas ended with different parameters: {digests}"
        )
    if accelerator.is_main_process:
        if loop.eval_at_end:
            metrics = evaluate_tasks(unwrapped.model, tasks, accelerator)
            accelerator.log(_flat_metrics(metrics), step=state.step)
            (output_dir / EVAL_RESULTS_FILE).write_text(json.dumps(metrics, indent=2))
        if state.usage_ema is not None:
            usage = {name: [ema[i].tolist() for ema in state.usage_ema] for i, name in enumerate(task_names)}
            (output_dir / EMA_USAGE_FILE).write_text(json.dumps(usage))
        if loop.save_final_model:
            final_dir = output_dir / FINAL_DIR
            unwrapped.model.save_pretrained(final_dir)
            if processor is not None:
                processor.save_pretrained(final_dir)
            (final_dir / LOSS_WEIGHTS_FILE).write_text(json.dumps(unwrapped.weighting.effective_weights()))
        (output_dir / REPLICA_DIGESTS_FILE).write_text(json.dumps(digests))
    accelerator.wait_for_everyone()
    end_training(accelerator)
    return TrainResult(
        output_dir,
        state.step,
        max_steps,
        None,
        metrics,
        history,
        final_dir,
        last_checkpoint,
        unwrapped.model,
        digests,
        out_of_time=state.step < max_steps,
    )


def _base_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> float:
    """`learning_rate` at the schedule's current factor (the rate of the new parameters, whatever the groups)."""
    group = optimizer.param_groups[0]
    return learning_rate * group["lr"] / group["initial_lr"]


def _group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`lr/<group>` of every named group, when the groups have more than one learning rate."""
    rates = group_learning_rates(optimizer)
    return {f"lr/{name}": rate for name, rate in rates.items()} if len(rates) > 1 else {}


def _flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        f"eval/{task}/{name}": value
        for task, values in metrics.items()
        for name, value in values.items()
        if isinstance(value, (int, float))
    }


def _flat_hparams(recipe: TrainingRecipe, max_steps: int, steps_per_epoch: int | None) -> dict[str, Any]:
    """Scalar hyper-parameters for the tracker (trackers accept only str, bool, int and float)."""
    flat: dict[str, Any] = {"max_steps": max_steps}
    if steps_per_epoch is not None:
        flat["steps_per_epoch"] = steps_per_epoch

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), child)
        elif isinstance(value, list):
            if all(isinstance(v, dict) and "name" in v for v in value):
                for child in value:
                    visit(f"{prefix}.{child['name']}", {k: v for k, v in child.items() if k != "name"})
            else:
                flat[prefix] = str(value)
        elif isinstance(value, (str, bool, int, float)):
            flat[prefix] = value
        elif value is not None:
            flat[prefix] = str(value)

    visit("", recipe.to_dict())
    return flat


__all__ = [
    "TrainResult",
    "TrainerState",
    "TrainingDivergedError",
    "build_accelerator",
    "build_mixer",
    "build_optimizer",
    "describe_groups",
    "evaluate_tasks",
    "forward_backward",
    "parameter_digest",
    "resolve_gradient_accumulation",
    "resolve_mixed_precision",
    "steps_for_epochs",
    "train",
    "use_cpu",
]
