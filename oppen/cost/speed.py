"""How long a run takes: a speed model measured from history or a short calibration.

A run's wall time is modelled as
    fixed_overhead  +  samples x seconds_per_sample  +  epochs x epoch_overhead  +  tail
where fixed_overhead is the data loading (and quoting) before training, epoch_overhead the
validation pass and checkpoint at each epoch end, and tail the test pass and model logging after
training. History measures all four; a calibration measures the first three and estimates the tail.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat

Z90 = 1.2816  # one-sided 90% quantile of the normal distribution

# The least relative spread a p90 assumes: this machine's run-to-run noise is ~±5-25%, and a
# calibration of a few steps sees less of it than whole runs do.
MIN_SPREAD = {"history": 0.05, "calibration": 0.10}


class SpeedEstimate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seconds_per_sample: PositiveFloat
    epoch_overhead_seconds: NonNegativeFloat
    fixed_overhead_seconds: NonNegativeFloat
    tail_seconds: NonNegativeFloat = 0.0
    source: Literal["history", "calibration"]
    observations: int = Field(ge=1, description="History runs, or timed calibration steps.")
    spread: NonNegativeFloat = Field(description="Relative standard deviation of seconds_per_sample.")

    @property
    def p90_factor(self) -> float:
        return 1.0 + Z90 * max(self.spread, MIN_SPREAD[self.source])


class RunShape(BaseModel):
    """What the run will do, from its config (no compute needed)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    total_steps: int = Field(ge=1)
    steps_per_epoch: int = Field(ge=1)
    batch_size: int = Field(ge=1)

    @property
    def samples(self) -> int:
        return self.total_steps * self.batch_size

    @property
    def epoch_ends(self) -> int:
        # Partial last epochs (max_steps) still end with a validation pass and a checkpoint.
        return -(-self.total_steps // self.steps_per_epoch)


def expected_seconds(speed: SpeedEstimate, shape: RunShape) -> float:
    return (
        shape.samples * speed.seconds_per_sample
        + shape.epoch_ends * speed.epoch_overhead_seconds
        + speed.fixed_overhead_seconds
        + speed.tail_seconds
    )


def epoch_seconds(speed: SpeedEstimate, shape: RunShape) -> float:
    return shape.steps_per_epoch * shape.batch_size * speed.seconds_per_sample + speed.epoch_overhead_seconds


class PastRun(BaseModel):
    """The speed measurements one finished run recorded (read back from MLflow)."""

    model_config = ConfigDict(frozen=True)

    seconds_per_sample: PositiveFloat
    epoch_overhead_seconds: NonNegativeFloat = 0.0
    fixed_overhead_seconds: NonNegativeFloat = 0.0
    tail_seconds: NonNegativeFloat = 0.0
    steps_per_epoch: int | None = Field(None, ge=1, description="The data's size in steps, for a quote before loading.")


def from_history(runs: Sequence[PastRun], recent: int = 10) -> SpeedEstimate | None:
    """Median speed of the most recent runs (None without any); the median shrugs off one slow outlier."""
    runs = list(runs)[:recent]
    if not runs:
        return None
    per_sample = [run.seconds_per_sample for run in runs]
    centre = statistics.median(per_sample)
    spread = statistics.pstdev(per_sample) / centre if len(per_sample) > 1 else 0.0
    return SpeedEstimate(
        seconds_per_sample=centre,
        epoch_overhead_seconds=statistics.median(run.epoch_overhead_seconds for run in runs),
        fixed_overhead_seconds=statistics.median(run.fixed_overhead_seconds for run in runs),
        tail_seconds=statistics.median(run.tail_seconds for run in runs),
        source="history",
        observations=len(runs),
        spread=spread,
    )


def from_calibration(
    step_seconds: Sequence[float], batch_size: int, eval_seconds: float, fixed_overhead_seconds: float,
    tail_seconds: float = 0.0,
) -> SpeedEstimate:
    """Speed from timed steps; the first steps (allocation, warm caches) should already be dropped."""
    if not step_seconds:
        raise ValueError("calibration timed no steps")
    centre = statistics.median(step_seconds)
    spread = statistics.pstdev(step_seconds) / centre if len(step_seconds) > 1 else 0.0
    return SpeedEstimate(
        seconds_per_sample=centre / batch_size,
        epoch_overhead_seconds=eval_seconds,
        fixed_overhead_seconds=fixed_overhead_seconds,
        tail_seconds=tail_seconds,
        source="calibration",
        observations=len(step_seconds),
        # Step-to-step jitter averages out over a whole run; what remains is the run-to-run drift.
        spread=spread / max(1.0, len(step_seconds) ** 0.5),
    )
