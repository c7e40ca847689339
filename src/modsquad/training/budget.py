"""The training loop's clock: a time-left estimate after the first steps, and a wall-clock budget
(`training.max_minutes`) that fits the run into a time limit.

With a budget the loop plans once, after `ESTIMATE_AFTER_STEPS` timed steps, how many steps fit: when fewer than
`max_steps` do, the learning-rate schedule is re-planned to end there (the cosine decays to its floor at the budget,
not halfway down). After every step it stops when the next step would end past the budget (the machine may slow
down after the plan). Either way the run ends as a finished one: the final evaluation, model and logs are written,
and [`TrainResult`] says how many of the planned steps were done.

Time is read on the main process only. Its decisions (stop now, the planned steps) travel to the other processes in
the loop's per-step all-reduce, so every process stops at the same step without a collective of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# Steps timed before the estimate is printed and the budget's plan is made. The run's first step is not timed: it
# carries one-time costs (allocator warm-up, first batches, lazy initialisation).
ESTIMATE_AFTER_STEPS = 5


@dataclass
class TimeEstimate:
    r"""
    How long the rest of a training run should take, from the steps timed so far.

    Args:
        step (`int`): optimizer steps done.
        planned_steps (`int`): steps the loop will run (`max_steps`, or fewer when a time budget holds fewer).
        max_steps (`int`): steps the recipe asked for.
        seconds_per_step (`float`): mean wall time of the timed steps.
        elapsed_seconds (`float`): wall time of the loop so far.
        budget_seconds (`float`, *optional*): the time budget, when one is set.
    """

    step: int
    planned_steps: int
    max_steps: int
    seconds_per_step: float
    elapsed_seconds: float
    budget_seconds: float | None = None

    @property
    def training_seconds_left(self) -> float:
        """Seconds until the last planned step (capped by the budget)."""
        left = (self.planned_steps - self.step) * self.seconds_per_step
        if self.budget_seconds is not None:
            left = min(left, max(0.0, self.budget_seconds - self.elapsed_seconds))
        return left

    def describe(self) -> str:
        """One line for the console: time left, pace, and the budget's plan."""
        line = (
            f"~{format_minutes(self.training_seconds_left)} of training left "
            f"({self.seconds_per_step:.2f} s/step, step {self.step} of {self.planned_steps})"
        )
        if self.planned_steps < self.max_steps:
            line += f"; the {self.budget_seconds / 60:g} min budget fits {self.planned_steps} of {self.max_steps} steps"
        return line


def format_minutes(seconds: float) -> str:
    """`"N min"` rounded up to whole minutes above one minute, `"N s"` below."""
    if seconds < 60:
        return f"{max(1, math.ceil(seconds))} s"
    return f"{math.ceil(seconds / 60)} min"


class StepClock:
    """Times the optimizer steps of one run of the loop, and decides what a time budget asks.

    Args:
        max_minutes (`float`, *optional*): the budget; `None` times without limiting.
        first_step (`int`, *optional*, defaults to 0): steps done before this run (resuming from a checkpoint);
            the budget counts this run's time only.
        clock (`Callable[[], float]`, *optional*): seconds of a monotonic clock, `time.perf_counter` by default
            (tests inject their own).
    """

    def __init__(
        self,
        max_minutes: float | None = None,
        first_step: int = 0,
        clock: Callable[[], float] | None = None,
    ):
        valid = (
            isinstance(max_minutes, (int, float)) and not isinstance(max_minutes, bool) and max_minutes > 0
        )
        if max_minutes is not None and not valid:
            raise ValueError(f"max_minutes must be a number > 0 or None, got {max_minutes!r}")
        self.budget_seconds = None if max_minutes is None else 60.0 * max_minutes
        self.first_step = first_step
        self._clock = clock or time.perf_counter
        self._started = self._clock()
        self._timed_from: tuple[int, float] | None = None  # (step, time) at the end of this run's first step
        self._last: tuple[int, float] = (first_step, self._started)

    def step_done(self, step: int) -> None:
        """Records that optimizer step `step` (1-based) just ended."""
        now = self._clock()
        if self._timed_from is None:
            self._timed_from = (step, now)
        self._last = (step, now)

    @property
    def steps_timed(self) -> int:
        """Steps after this run's first one (the ones the pace is measured on)."""
        return 0 if self._timed_from is None else self._last[0] - self._timed_from[0]

    @property
    def elapsed_seconds(self) -> float:
        """Wall time from the start of this run to the end of its last step."""
        return self._last[1] - self._started

    @property
    def seconds_per_step(self) -> float | None:
        """Mean wall time of a step: over the timed steps, or the first step alone until there are some."""
        if self._timed_from is None:
            return None
        if self.steps_timed == 0:
            return self.elapsed_seconds / max(1, self._last[0] - self.first_step)
        return (self._last[1] - self._timed_from[1]) / self.steps_timed

    def out_of_time(self) -> bool:
        """Whether the next step would end past the budget (never without a budget)."""
        pace = self.seconds_per_step
        if self.budget_seconds is None or pace is None:
            return False
        return self.elapsed_seconds + pace > self.budget_seconds

    def steps_that_fit(self, max_steps: int) -> int:
        """Steps the run can reach within the budget at the measured pace (at most `max_steps`, at least the
        steps already done)."""
        pace = self.seconds_per_step
        step = self._last[0]
        if self.budget_seconds is None or pace is None or pace <= 0:
            return max_steps
        more = math.floor(max(0.0, self.budget_seconds - self.elapsed_seconds) / pace)
        return max(step, min(max_steps, step + more))

    def estimate(self, planned_steps: int, max_steps: int) -> TimeEstimate | None:
        """The [`TimeEstimate`] at the last recorded step, `None` before any step ended."""
        pace = self.seconds_per_step
        if pace is None:
            return None
        return TimeEstimate(
            step=self._last[0],
            planned_steps=planned_steps,
            max_steps=max_steps,
            seconds_per_step=pace,
            elapsed_seconds=self.elapsed_seconds,
            budget_seconds=self.budget_seconds,
        )


__all__ = ["ESTIMATE_AFTER_STEPS", "StepClock", "TimeEstimate", "format_minutes"]
