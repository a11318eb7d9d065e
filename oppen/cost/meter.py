"""The cost meter: a training callback that prices real elapsed time, forecasts, and enforces the cap.

It charges wall time x resources at the price in force at each moment (a run crossing 22:00 pays
the off-peak rate from 22:00 on), forecasts the final cost during the first epoch from step times
and after every epoch from whole epochs, reports budget thresholds, and asks the loop to stop
before the step that would cross the cap. It knows nothing of Prefect or MLflow: what happens
with forecasts and threshold events is injected (`on_forecast`, `on_event`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

from oppen.cost.forecast import (
    at,
    crossed_thresholds,
    forecast_total_usd,
    next_step_seconds,
    remaining_seconds,
    would_cross_cap,
)
from oppen.cost.price_book import PriceBook, Resources
from oppen.cost.pricing import price_interval
from training.callbacks import Callback, LoopControl, RunInfo, StepInfo
from training.results import EpochRecord, TrainResult

Clock = Callable[[], datetime]
THRESHOLDS = (0.5, 0.7, 0.9, 1.0)


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class ForecastPoint:
    step: int
    epoch: float  # fractional: 0.4 = 40% through epoch 1
    accrued_usd: float
    forecast_usd: float
    basis: str  # "steps" (during epoch 1) or "epochs"


@dataclass(frozen=True)
class CostEvent:
    name: str  # oppen.cost.threshold | oppen.cost.cap_reached
    payload: dict


@dataclass
class MeterTotals:
    usd: float = 0.0
    peak_seconds: float = 0.0
    off_peak_seconds: float = 0.0
    on_demand_usd: float = 0.0

    @property
    def seconds(self) -> float:
        return self.peak_seconds + self.off_peak_seconds


@dataclass
class _Timing:
    step_walls: list[float] = field(default_factory=list)  # this epoch's step-to-step intervals
    last_epoch_step_seconds: float | None = None
    last_step_end: datetime | None = None
    epoch_overheads: list[float] = field(default_factory=list)
    pending_overhead_from: datetime | None = None  # last step end of an ended epoch, until the next step
    provisional_overhead: float | None = None


class CostMeter(Callback):
    def __init__(
        self,
        book: PriceBook,
        resources: Resources,
        *,
        spot: bool = False,
        cap_usd: float | None = None,
        threshold_base_usd: float | None = None,
        expected_step_seconds: float | None = None,
        expected_epoch_overhead_seconds: float = 0.0,
        tail_reserve_seconds: float = 0.0,
        clock: Clock = system_clock,
        on_event: Callable[[CostEvent], None] | None = None,
        on_forecast: Callable[[ForecastPoint], None] | None = None,
        forecasts_per_first_epoch: int = 10,
        thresholds: tuple[float, ...] = THRESHOLDS,
        started_at: datetime | None = None,
    ) -> None:
        self.book, self.resources, self.spot = book, resources, spot
        self.cap_usd = cap_usd
        # Thresholds are fractions of the cap, else of what was reserved for the run.
        self.threshold_base_usd = cap_usd or threshold_base_usd
        self.expected_step_seconds = expected_step_seconds
        self.expected_epoch_overhead_seconds = expected_epoch_overhead_seconds
        # Work that follows training (test pass, model logging) and is always completed: kept inside the cap.
        self.tail_reserve_seconds = tail_reserve_seconds
        self.clock = clock
        self.on_event = on_event
        self.on_forecast = on_forecast
        self.forecasts_per_first_epoch = forecasts_per_first_epoch
        self.thresholds = thresholds
        # Billing starts here; a flow passes its own start so loading and quoting are billed too.
        self.started_at = started_at or clock()
        self._last_tick = self.started_at
        self.totals = MeterTotals()
        self.timing = _Timing()
        self.info: RunInfo | None = None
        self.forecasts: list[ForecastPoint] = []
        self.events: list[CostEvent] = []
        self.epoch_costs: list[tuple[int, float]] = []  # (epoch, cumulative USD at its end)
        self.step_costs: list[float] = []  # USD of each step this meter saw, for overshoot reporting
        self.training_usd_at_start: float | None = None
        self.training_usd_at_end: float | None = None
        self.seconds_at_train_start: float | None = None
        self.seconds_at_train_end: float | None = None
        self.stopped_for_cap: str | None = None
        self.tail_reserve_usd = 0.0  # priced when the cap stops the run
        self.epoch_ends_done = 0
        self._step_started_usd = 0.0

    # --- accrual -------------------------------------------------------------------------

    def tick(self) -> datetime:
        """Charge the time since the last tick at the prices in force over it; returns now."""
        now = self.clock()
        if now > self._last_tick:
            cost = price_interval(self.book, self.resources, self._last_tick, now, spot=self.spot)
            before = self.totals.usd
            self.totals.usd += cost.usd
            self.totals.peak_seconds += cost.peak_seconds
            self.totals.off_peak_seconds += cost.off_peak_seconds
            self.totals.on_demand_usd += cost.on_demand_usd
            self._last_tick = now
            self._check_thresholds(before, self.totals.usd)
        return now

    def price(self, start: datetime, seconds: float) -> float:
        return price_interval(self.book, self.resources, start, at(start, seconds), spot=self.spot).usd

    @property
    def accrued_usd(self) -> float:
        return self.totals.usd

    # --- estimates -----------------------------------------------------------------------

    def step_seconds_estimate(self) -> float | None:
        walls = self.timing.step_walls
        if len(walls) >= 3:
            return statistics.fmean(walls[-200:])
        if self.timing.last_epoch_step_seconds is not None:
            return self.timing.last_epoch_step_seconds
        return self.expected_step_seconds

    def epoch_overhead_estimate(self) -> float:
        if self.timing.epoch_overheads:
            return self.timing.epoch_overheads[-1]
        if self.timing.provisional_overhead is not None:
            return self.timing.provisional_overhead
        return self.expected_epoch_overhead_seconds

    def forecast_now(self, now: datetime, step: int, basis: str) -> ForecastPoint | None:
        info = self.info
        step_seconds = self.step_seconds_estimate()
        if info is None or step_seconds is None:
            return None
        left = remaining_seconds(
            steps_done=step, total_steps=info.total_steps, steps_per_epoch=info.steps_per_epoch,
            step_seconds=step_seconds, epoch_overhead_seconds=self.epoch_overhead_estimate(),
            epoch_ends_done=self.epoch_ends_done,
        ) + self.tail_reserve_seconds
        point = ForecastPoint(
            step=step,
            epoch=step / info.steps_per_epoch,
            accrued_usd=self.totals.usd,
            forecast_usd=forecast_total_usd(self.totals.usd, now, left, self.price),
            basis=basis,
        )
        self.forecasts.append(point)
        if self.on_forecast:
            self.on_forecast(point)
        return point

    # --- training callbacks --------------------------------------------------------------

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        self.info = info
        self.tick()
        if self.training_usd_at_start is None:
            self.training_usd_at_start = self.totals.usd
            self.seconds_at_train_start = self.totals.seconds
        # A resumed attempt (after a reclaim) starts a fresh epoch timing; epochs already ended stay counted.
        self.epoch_ends_done = info.start_step // info.steps_per_epoch
        self.timing.step_walls = []
        self.timing.last_step_end = None
        self.timing.pending_overhead_from = None

    def on_step_begin(self, step: StepInfo, control: LoopControl) -> None:
        now = self.tick()
        self._close_epoch_overhead(now)
        self._step_started_usd = self.totals.usd
        if self.cap_usd is None:
            return
        step_seconds = self.step_seconds_estimate() or 0.0
        ends_epoch = step.batch_in_epoch == step.steps_per_epoch or step.step == step.total_steps
        unit = next_step_seconds(step_seconds, ends_epoch, self.epoch_overhead_estimate())
        unit_usd = self.price(now, unit)
        tail_usd = self.price(at(now, unit), self.tail_reserve_seconds)
        if would_cross_cap(self.totals.usd, unit_usd + tail_usd, self.cap_usd):
            self.tail_reserve_usd = tail_usd
            self.stopped_for_cap = (
                f"budget cap ${self.cap_usd:.6f} reached before step {step.step}/{step.total_steps}: "
                f"spent ${self.totals.usd:.6f}, the next step would cost ~${unit_usd:.6f} and "
                f"${tail_usd:.6f} is kept for evaluating and logging the model"
            )
            self._emit("oppen.cost.cap_reached", {
                "cap_usd": self.cap_usd, "accrued_usd": self.totals.usd, "step": step.step,
                "total_steps": step.total_steps, "next_step_usd": unit_usd, "tail_reserve_usd": tail_usd,
            })
            control.request_stop(self.stopped_for_cap)

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        now = self.tick()
        self.step_costs.append(self.totals.usd - self._step_started_usd)
        if self.timing.last_step_end is not None:
            self.timing.step_walls.append((now - self.timing.last_step_end).total_seconds())
        elif step.step_seconds is not None:
            self.timing.step_walls.append(step.step_seconds)  # first step of an attempt: its own compute time
        self.timing.last_step_end = now
        if self.epoch_ends_done == 0 and self.info is not None:
            every = max(1, self.info.steps_per_epoch // self.forecasts_per_first_epoch)
            if step.step % every == 0 and len(self.timing.step_walls) >= 3:
                self.forecast_now(now, step.step, "steps")

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        now = self.tick()
        if self.timing.step_walls:
            self.timing.last_epoch_step_seconds = statistics.fmean(self.timing.step_walls)
        if self.timing.last_step_end is not None:
            # Validation + checkpoint so far; the full gap is measured when the next step starts.
            self.timing.provisional_overhead = (now - self.timing.last_step_end).total_seconds()
            self.timing.pending_overhead_from = self.timing.last_step_end
        self.timing.step_walls = []
        self.timing.last_step_end = None
        self.epoch_ends_done += 1
        self.epoch_costs.append((epoch.epoch, self.totals.usd))
        self.forecast_now(now, epoch.step, "epochs")

    def on_train_end(self, result: TrainResult, control: LoopControl) -> None:
        now = self.tick()
        self._close_epoch_overhead(now)
        self.training_usd_at_end = self.totals.usd
        self.seconds_at_train_end = self.totals.seconds

    def _close_epoch_overhead(self, now: datetime) -> None:
        """The gap from an epoch's last step to the next step (or the end) is that epoch's overhead."""
        if self.timing.pending_overhead_from is not None:
            self.timing.epoch_overheads.append((now - self.timing.pending_overhead_from).total_seconds())
            self.timing.pending_overhead_from = None

    # --- thresholds ----------------------------------------------------------------------

    def _check_thresholds(self, before: float, after: float) -> None:
        base = self.threshold_base_usd
        if not base:
            return
        for fraction in crossed_thresholds(before / base, after / base, self.thresholds):
            self._emit("oppen.cost.threshold", {
                "fraction": fraction, "accrued_usd": after, "of_usd": base,
                "of": "cap" if self.cap_usd else "reservation",
            })

    def _emit(self, name: str, payload: dict) -> None:
        event = CostEvent(name, payload)
        self.events.append(event)
        if self.on_event:
            self.on_event(event)
