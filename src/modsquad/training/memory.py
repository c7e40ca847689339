"""Peak memory of a training step, read from the CPU allocator: one graph over every task micro-batch against one task
graph at a time.

How the peak is measured. PyTorch's CPU allocator reports every allocation and free of tensor memory to the profiler
when `torch.profiler.profile(profile_memory=True)` is active (c10's `ProfiledCPUMemoryReporter`: the size of each
block, signed, with a timestamp). Summing those reports in time order gives the bytes allocated inside the profiled
region and still alive at each moment; its maximum is the allocator's peak for the region, above what was allocated
before (parameters, optimizer state). This counts exactly the tensor storages the step creates (activations kept for
the backward, temporaries, gradients), not the process's resident size (which also holds freed pages the C allocator
keeps, the interpreter and libraries) and not the scratch buffers a math library may allocate by itself. The sums are
taken from the profiler's public trace export (`export_chrome_trace`, `[memory]` events).
"""

from __future__ import annotations

import gc
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from ..model.modeling_multitask import ModSquadForMultiTask

# `Device Type` of CPU memory events in the profiler's trace (c10::DeviceType::CPU).
_CPU_DEVICE_TYPE = 0


@dataclass
class AllocatorPeak:
    """CPU tensor memory allocated inside a profiled region.

    Attributes:
        peak_bytes (`int`): the most bytes allocated in the region and alive at once.
        end_bytes (`int`): bytes allocated in the region and still alive at its end (e.g. parameter gradients).
        allocations (`int`): allocations made in the region.
    """

    peak_bytes: int
    end_bytes: int
    allocations: int


def allocator_peak(fn: Callable[[], Any]) -> AllocatorPeak:
    """Runs `fn()` under the profiler's memory tracking and returns the CPU allocator's peak over it.

    Args:
        fn (`Callable[[], Any]`): the region to measure; its return value is dropped before the region ends.

    Returns:
        [`AllocatorPeak`]: bytes above what was allocated before `fn` started (see the module docstring).
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        gc.collect()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = sorted(
        (
            (float(event["ts"]), int(event["args"]["Bytes"]))
            for event in events
            if event.get("name") == "[memory]" and event["args"].get("Device Type") == _CPU_DEVICE_TYPE
        ),
        key=lambda item: item[0],
    )
    live = peak = allocations = 0
    for _, size in memory:
        live += size
        peak = max(peak, live)
        allocations += size > 0
    return AllocatorPeak(peak, live, allocations)


def step_peak_memory(
    model: ModSquadForMultiTask,
    micro_batches: list[tuple[str, dict]],
    one_task_at_a_time: bool,
    horizon: float = 10.0,
) -> AllocatorPeak:
    """Allocator peak of the forward and backward of one training step, as the trainer runs it.

    The step uses the streaming mutual-information estimator (one task at a time needs it; it costs no activation
    memory of its own) and starts from gradients set to `None`, as after `optimizer.zero_grad()`, so the parameter
    gradients the step creates are part of its peak in both modes.

    Args:
        model ([`ModSquadForMultiTask`]): the model, in training mode.
        micro_batches (`list[tuple[str, dict]]`): the step's `(task, batch)` pairs.
        one_task_at_a_time (`bool`): one forward and backward per micro-batch, else one graph over all of them.
        horizon (`float`, *optional*, defaults to 10.0): horizon of the streaming estimate.

    Returns:
        [`AllocatorPeak`].
    """
    from accelerate import Accelerator

    from ..pruning.usage import router_layout
    from .step import MultiTaskStep, StreamingRoutingStatistics
    from .trainer import forward_backward

    accelerator = Accelerator(cpu=True)
    estimate = StreamingRoutingStatistics(model.config.num_tasks, horizon)
    # The estimate's running sums live across steps, as the optimizer state does: allocate them before the
    # measured region, so that the step's bytes are its own (activations, temporaries, gradients).
    estimate.sums = [
        torch.zeros(model.config.num_tasks, slot.num_experts, device=model.device)
        for slot in router_layout(model.config)
    ]
    step = MultiTaskStep(model, routing_estimate=estimate).train()
    model.zero_grad(set_to_none=True)

    def run() -> None:
        forward_backward(accelerator, step, micro_batches, one_task_at_a_time)

    result = allocator_peak(run)
    model.zero_grad(set_to_none=True)
    return result


__all__ = ["AllocatorPeak", "allocator_peak", "step_peak_memory"]
