"""Spot interruptions on the local pool: drawn from the price book's rate with a seed, then resumed.

Reclaims are a Poisson process in wall time: the gap to the next one is exponential with mean
1/rate. A reclaim gives the run no chance to checkpoint, so everything since the last checkpoint
is lost; the run restarts from that checkpoint, and the lost minutes (and the restart) are billed,
because on a real spot node they are billed too.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TypeVar

from oppen.cost.meter import Clock, system_clock
from training.callbacks import Callback, LoopControl, RunInfo, StepInfo


class SimulatedInterruption(RuntimeError):
    """The spot node was reclaimed (simulated): the process loses everything since its last checkpoint."""


@dataclass
class Interruption:
    at: datetime
    step: int  # the step that was about to run
    resumed_from_step: int  # where the next attempt restarts (last checkpoint)
    lost_seconds: float  # work done since that checkpoint, thrown away


@dataclass
class InterruptionSchedule:
    rate_per_hour: float
    seed: int
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def next_gap_seconds(self) -> float:
        if self.rate_per_hour <= 0:
            return float("inf")
        return self._rng.expovariate(self.rate_per_hour / 3600.0)


class SpotSimulator(Callback):
    """Raises SimulatedInterruption at the drawn reclaim times; remembers the checkpoint it resumes from."""

    def __init__(self, schedule: InterruptionSchedule, clock: Clock = system_clock) -> None:
        self.schedule = schedule
        self.clock = clock
        self.interruptions: list[Interruption] = []
        self._next_at: datetime | None = None
        self._checkpoint_step = 0
        self._checkpoint_at: datetime | None = None

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        now = self.clock()
        self._checkpoint_step = info.start_step
        self._checkpoint_at = now  # nothing of this attempt is at risk yet
        if self._next_at is None or self._next_at <= now:
            self._schedule_from(now)

    def on_checkpoint(self, path: str, step: int, control: LoopControl) -> None:
        self._checkpoint_step = step
        self._checkpoint_at = self.clock()

    def on_step_begin(self, step: StepInfo, control: LoopControl) -> None:
        now = self.clock()
        if self._next_at is not None and now >= self._next_at:
            lost = (now - self._checkpoint_at).total_seconds() if self._checkpoint_at else 0.0
            self.interruptions.append(Interruption(now, step.step, self._checkpoint_step, lost))
            self._schedule_from(now)
            raise SimulatedInterruption(
                f"spot reclaim (simulated) before step {step.step}; resuming from step {self._checkpoint_step}, "
                f"{lost:.1f}s of work lost"
            )

    def _schedule_from(self, now: datetime) -> None:
        gap = self.schedule.next_gap_seconds()
        self._next_at = None if gap == float("inf") else now + timedelta(seconds=gap)

    @property
    def lost_seconds(self) -> float:
        return sum(item.lost_seconds for item in self.interruptions)


T = TypeVar("T")


def run_through_reclaims(
    attempt: Callable[[], T], max_attempts: int = 50, on_reclaim: Callable[[int, SimulatedInterruption], None] | None = None,
) -> T:
    """Call `attempt` (a training run that resumes from its checkpoint) until it finishes without a reclaim."""
    for number in range(1, max_attempts + 1):
        try:
            return attempt()
        except SimulatedInterruption as reclaim:
            if on_reclaim:
                on_reclaim(number, reclaim)
    # A rate so high that this many reclaims happen is a misconfiguration, not bad luck.
    raise RuntimeError(f"gave up after {max_attempts} spot interruptions")
