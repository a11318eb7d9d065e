"""Forecast math and the stop rule, as pure functions (unit-tested apart from any training loop)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta

# price(start, seconds) -> USD of holding the run's resources for `seconds` from `start`.
PriceFn = Callable[[datetime, float], float]


def remaining_seconds(
    *, steps_done: int, total_steps: int, steps_per_epoch: int, step_seconds: float, epoch_overhead_seconds: float,
    epoch_ends_done: int,
) -> float:
    """Wall time still to come: the steps left, plus the validation/checkpoint of each epoch not yet ended."""
    steps_left = max(0, total_steps - steps_done)
    epoch_ends_total = math.ceil(total_steps / steps_per_epoch)
    epoch_ends_left = max(0, epoch_ends_total - epoch_ends_done)
    return steps_left * step_seconds + epoch_ends_left * epoch_overhead_seconds


def forecast_total_usd(accrued_usd: float, now: datetime, remaining_s: float, price: PriceFn) -> float:
    """What the run will have cost when it ends: spent so far + the rest priced at the rates in force then."""
    return accrued_usd + price(now, remaining_s)


def next_step_seconds(step_seconds: float, ends_epoch: bool, epoch_overhead_seconds: float) -> float:
    """Wall time the next unit of work holds the resources: a step, plus its epoch's end if it is the last."""
    return step_seconds + (epoch_overhead_seconds if ends_epoch else 0.0)


def would_cross_cap(accrued_usd: float, next_unit_usd: float, cap_usd: float) -> bool:
    """The stop rule: do not start work that would end above the cap.

    Whenever work is started, accrued + estimate <= cap, so the final cost exceeds the cap by at
    most (actual - estimated) cost of that one unit: never more than one step.
    """
    return accrued_usd + next_unit_usd > cap_usd


def crossed_thresholds(before: float, after: float, thresholds: tuple[float, ...]) -> list[float]:
    """Fractions of a budget newly reached when use moves from `before` to `after` (each fires once)."""
    return [t for t in thresholds if before < t <= after]


def relative_error(forecast: float, actual: float) -> float:
    return (forecast - actual) / actual if actual else 0.0


def at(start: datetime, seconds: float) -> datetime:
    return start + timedelta(seconds=seconds)
