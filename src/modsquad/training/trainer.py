"""Heterogeneous multi-task training with 🤗 Accelerate.

`train(recipe)` is the whole loop, in the style of Accelerate's examples: `prepare`, `accumulate`, `backward`,
`clip_grad_norm_`, `save_state` all appear in one function. One optimizer step is `gradient_accumulation_steps`
multi-task micro-steps; one micro-step is ONE forward of a [`MultiTaskStep`] over every task micro-batch the mixer
gives (all tasks under `simt`), then ONE backward of weighted task losses + auxiliary losses + the mutual-information
loss, whose routing statistics are all-reduced across processes. With the per-step estimator the MI window is one
micro-step (accumulation adds independent micro-steps); with the streaming one (`optimization.mi_estimator:
streaming`) it spans recent steps, and `training.one_task_at_a_time` runs one forward and backward per task
micro-batch instead (DDP reduces gradients in the last backward of the optimizer step only).

Run it with `modsquad train --config recipe.yaml` or `accelerate launch training/train.py --config recipe.yaml`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    is_npu_available,
    is_xpu_available,
    send_to_device,
    set_seed,
)
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..data.mixing import MultiTaskMixer, TaskStream
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
from .checkpointing import (
    COMPLETE_MARKER,
    StopOnSignal,
    checkpoint_path,
    prune_checkpoints,
    resolve_resume,
)
from .recipe import TrainingRecipe
from .step import (
    MultiTaskStep,
    MultiTaskStepOutput,
    StreamingRoutingStatistics,
    TaskLossWeighting,
    merge_step_outputs,
)
from .task_data import TaskData
from .tracking import CSVTracker

# Parameters that weight decay should leave alone: biases, norms, learned tokens and embeddings, loss log-variances.
NO_DECAY = ("bias", "norm", "cls_token", "task_tokens", "position_embeddings", "log_vars")


@dataclass
class TrainResult:
    r"""
    What a training run leaves behind.

    Args:
        output_dir (`Path`): the run folder.
        step (`int`): optimizer steps done.
        max_steps (`int`): optimizer steps planned.
        interrupted (`int`, *optional*): the signal that stopped the run early (a checkpoint was saved).
        metrics (`dict[str, dict[str, float]]`): last evaluation, per task.
        history (`list[dict]`): the training-log lines written by this process's run (main process).
        final_dir (`Path`, *optional*): `save_pretrained` folder of the final model (and processor).
        checkpoint (`Path`, *optional*): the last checkpoint written.
        model ([`ModSquadForMultiTask`], *optional*): the trained model (unwrapped), on this process.
        replica_digests (`list[str]`): SHA-256 of every process's parameters after training (all equal when the
            replicas stayed in sync; one entry for a single process).
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
        return {"step": self.step, "usage_ema": self.usage_ema, "usage_seen": self.usage_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.usage_ema = state["usage_ema"]
        self.usage_seen = state["usage_seen"]


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

    def reduce(self, accelerator: Accelerator, stop_requested: bool) -> tuple[bool, dict[str, Any]]:
        """Sums over processes. Returns whether any process asked to stop, and the step's mean `loss`, `aux_loss`,
        `mi_loss`, per-task mean `task_losses` (`None` for tasks absent from the step) and expert-usage counts."""
        flag = torch.tensor([1.0 if stop_requested else 0.0], device=self.sums.device)
        totals = accelerator.reduce(torch.cat([flag, self.sums]), reduction="sum").cpu()
        stop, totals = bool(totals[0] > 0), totals[1:]
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
        }


# ----------------------------------------------------------------------------------------------- building blocks
def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr_ratio` of the peak at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def build_optimizer(
    module: torch.nn.Module, learning_rate: float, weight_decay: float, betas
) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (experts, projections, routers), none on `NO_DECAY` names."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        (no_decay if param.ndim <= 1 or any(key in lowered for key in NO_DECAY) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(betas))


def use_cpu(requested: bool) -> bool:
    """Whether to train on the CPU: when asked, and when a launcher started several processes on a machine without
    an accelerator (Accelerate joins CPU processes into one gloo group only when told `cpu=True`; otherwise each
    process would silently train alone)."""
    if requested:
        return True
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return launched and not (torch.cuda.is_available() or is_xpu_available() or is_npu_available())


def resolve_mixed_precision(requested: str, cpu: bool) -> str:
    """`"auto"` -> bf16 on GPUs that support it, fp16 on other GPUs, `"no"` on CPU; explicit choices pass through."""
    if requested != "auto":
        return requested
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def build_mixer(
    recipe: TrainingRecipe, tasks: list[TaskData], num_processes: int, process_index: int
) -> MultiTaskMixer:
    """One sharded [`TaskStream`] per task, mixed by the recipe's strategy."""
    streams = {
        task.name: TaskStream(
            len(task.train_dataset),
            task.batch_size,
            task.make_loader,
            seed=recipe.seed,
            task_index=index,
            num_replicas=num_processes,
            rank=process_index,
        )
        for index, task in enumerate(tasks)
    }
    return MultiTaskMixer(
        streams,
        strategy=recipe.mixing.strategy,
        temperature=recipe.mixing.temperature,
        tasks_per_step=recipe.mixing.tasks_per_step,
        seed=recipe.seed,
    )


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


# Tensors of the replica check's all-gather, kept for the life of the process. gloo's worker threads hold the last
# collectives they ran until the process group is torn down; if those still point at tensors Python has dropped,
# freeing them there needs the GIL, which the tearing-down main thread holds: a deadlock that now and then hung a
# finished multi-process run. Tensors Python still references are freed without the GIL.
_GATHER_BUFFERS: list[torch.Tensor] = []


def gather_parameter_digests(accelerator: Accelerator, module: torch.nn.Module) -> list[str]:
    """Every process's [`parameter_digest`] of `module`, in rank order."""
    digest = parameter_digest(module)
    if accelerator.num_processes == 1:
        return [digest]
    local = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=accelerator.device)
    gathered = [torch.empty_like(local) for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather(gathered, local)
    _GATHER_BUFFERS.extend([local, *gathered])
    return [bytes(tensor.cpu().tolist()).hex() for tensor in gathered]


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
) -> TrainResult:
    """Trains a multi-task Mod-Squad model as the recipe says.

    The data and the model are built above the loop and handed to it, as in Accelerate's examples:
    `tasks, processor = build_task_data(recipe)` and `model = build_model(recipe, tasks)` (`training.task_data`).

    Args:
        recipe ([`TrainingRecipe`]): the run.
        model ([`ModSquadForMultiTask`]): the model to train (the same initial weights on every process).
        tasks (`list[TaskData]`): the data, in the model's task order.
        processor (*optional*): image processor saved with the final model.

    Returns:
        [`TrainResult`].
    """
    loop, optim = recipe.training, recipe.optimization
    output_dir = Path(recipe.output_dir)
    cpu = use_cpu(loop.cpu)
    mixed_precision = resolve_mixed_precision(loop.mixed_precision, cpu)
    find_unused = loop.find_unused_parameters
    if find_unused is None:
        # Sampling strategies may leave a task, hence its head, out of a step, and one task graph at a time leaves
        # every other head out of each forward: let DDP skip those parameters.
        find_unused = recipe.mixing.strategy != "simt" or loop.one_task_at_a_time
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=loop.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=None if loop.tracker == "none" else [_tracker(loop.tracker, output_dir)],
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / LOGS_DIR)
        ),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )
    set_seed(recipe.seed)  # the same data order and training noise on every process
    if [t.name for t in tasks] != model.config.task_names:
        raise ValueError(
            f"task data {[t.name for t in tasks]} must match the model's tasks {model.config.task_names}"
        )

    mixer = build_mixer(recipe, tasks, accelerator.num_processes, accelerator.process_index)
    accumulation = loop.gradient_accumulation_steps
    max_steps = loop.max_steps or max(1, math.ceil(loop.num_epochs * mixer.steps_per_epoch / accumulation))
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
    optimizer = build_optimizer(step_module, optim.learning_rate, optim.weight_decay, optim.betas)
    warmup = max(optim.warmup_steps, int(optim.warmup_ratio * max_steps))
    # The schedule counts optimizer steps and is stepped by hand: a prepared scheduler would step once per process.
    scheduler = warmup_cosine_schedule(optimizer, warmup, max_steps, optim.min_lr_ratio)
    step_module, optimizer = accelerator.prepare(step_module, optimizer)
    state = TrainerState(model.config.num_tasks, loop.usage_ema_decay)
    accelerator.register_for_checkpointing(scheduler, mixer, state)
    if routing_estimate is not None:
        accelerator.register_for_checkpointing(routing_estimate)

    log_path = output_dir / TRAINING_LOG
    resume_from = resolve_resume(recipe.resume, output_dir)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        recipe.to_yaml(output_dir / RECIPE_FILE)
        # Steps after the checkpoint are trained again: forget what the interrupted run logged for them.
        kept = _read_history(log_path, state.step)
        log_path.write_text("".join(json.dumps(line) + "\n" for line in kept))
    if loop.tracker != "none":
        accelerator.init_trackers("tracker", config=_flat_hparams(recipe, max_steps, mixer.steps_per_epoch))
        for tracker in accelerator.trackers:
            if isinstance(tracker, CSVTracker):
                tracker.drop_after(state.step)

    history: list[dict] = []
    metrics: dict[str, dict[str, float]] = {}
    last_checkpoint: Path | None = resume_from
    task_names = model.config.task_names
    coef = model.config.mi_loss_coef

    def save_checkpoint() -> Path:
        folder = checkpoint_path(output_dir, state.step)
        accelerator.save_state(str(folder))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (folder / COMPLETE_MARKER).write_text(json.dumps({"step": state.step, "max_steps": max_steps}))
            prune_checkpoints(output_dir, loop.keep_last)
        accelerator.wait_for_everyone()
        return folder

    step_module.train()
    progress = tqdm(
        total=max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
    )
    started = time.perf_counter()
    with StopOnSignal() as stop:
        while state.step < max_steps:
            sums = StepSums(accelerator.num_processes * accumulation)
            for _ in range(accumulation):
                micro_batches = send_to_device(mixer.next_step(), accelerator.device)
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

            # One all-reduce per step: losses, usage counts and the stop request travel together.
            stopped_anywhere, reduced = sums.reduce(accelerator, stop.requested is not None)
            # A signal during the last step changes nothing: the run is finishing anyway.
            stop_everywhere = stopped_anywhere and state.step < max_steps
            if reduced["usage"]:
                state.update_usage(reduced["usage"])

            if state.step % loop.log_every == 0 or state.step == max_steps or stop_everywhere:
                weights = accelerator.unwrap_model(step_module).weighting.effective_weights()
                line = {
                    "step": state.step,
                    "epoch": state.step * accumulation / mixer.steps_per_epoch,
                    "lr": scheduler.get_last_lr()[0],
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

            if loop.eval_every and state.step % loop.eval_every == 0 and state.step < max_steps:
                if accelerator.is_main_process:
                    metrics = evaluate_tasks(accelerator.unwrap_model(step_module).model, tasks, accelerator)
                    accelerator.log(_flat_metrics(metrics), step=state.step)
                accelerator.wait_for_everyone()
            if stop_everywhere or (loop.save_every and state.step % loop.save_every == 0):
                last_checkpoint = save_checkpoint()
            if stop_everywhere:
                progress.close()
                accelerator.print(
                    f"stopped by signal {stop.requested or 'on another process'}; checkpoint {last_checkpoint}"
                )
                accelerator.end_training()
                return TrainResult(
                    output_dir, state.step, max_steps, stop.requested or -1, metrics, history,
                    checkpoint=last_checkpoint, model=accelerator.unwrap_model(step_module).model,
                )  # fmt: skip
    progress.close()

    if loop.save_every and state.step % loop.save_every:
        last_checkpoint = save_checkpoint()
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
    accelerator.end_training()
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
    )


def _tracker(kind: str, output_dir: Path):
    if kind == "csv":
        return CSVTracker("tracker", output_dir / LOGS_DIR)
    return kind


def _flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    return {
        f"eval/{task}/{name}": value
        for task, values in metrics.items()
        for name, value in values.items()
        if isinstance(value, (int, float))
    }


def _flat_hparams(recipe: TrainingRecipe, max_steps: int, steps_per_epoch: int) -> dict[str, Any]:
    """Scalar hyper-parameters for the tracker (trackers accept only str, bool, int and float)."""
    flat: dict[str, Any] = {"max_steps": max_steps, "steps_per_epoch": steps_per_epoch}

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
    "build_mixer",
    "build_optimizer",
    "evaluate_tasks",
    "forward_backward",
    "parameter_digest",
    "resolve_mixed_precision",
    "train",
    "use_cpu",
]
