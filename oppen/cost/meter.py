"""The cost meter: a training callback that prices real elapsed time, forecasts, and keeps the run in its hold.

It charges elapsed time x resources at the price in force at each moment: durations come from a
monotonic clock (a wall-clock step from NTP never bills or refunds anything), and the wall clock
only says which price was in force (a run crossing 22:00 pays the off-peak rate from 22:00 on).
What it charges is kept per UTC month, so each month's budget gets what ran in it.

It forecasts the final cost during the first epoch from step times and after every epoch, and
reports thresholds (50/70/90/100%) of the run's cap and of each budget. Before each step it
checks that the step, a safety margin of one more step, and the work that always follows
training (test pass, model logging) fit in this attempt's hold; when they do not, it asks for a
bigger hold (`extend`, atomic against the budgets and the run's cap) and stops cleanly if none
is granted. It knows nothing of Prefect or MLflow: forecasts, events and top-ups are injected.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from oppen.cost.forecast import (
    at,
    crossed_thresholds,
    forecast_total_usd,
    next_step_seconds,
    remaining_seconds,
    would_cross_cap,
)
from oppen.cost.price_book import PriceBook, Resources
from oppen.cost.pricing import PriceCursor
from oppen.cost.windows import utc_month_slices
from training.callbacks import Callback, LoopControl, RunInfo, StepInfo
from training.results import EpochRecord, TrainResult

Clock = Callable[[], datetime]
Monotonic = Callable[[], float]
# extend(wanted hold in USD) -> (the hold now, what limited it or None): an atomic top-up in the ledger.
Extend = Callable[[float], tuple[float, str | None]]
THRESHOLDS = (0.5, 0.7, 0.9, 1.0)
# The first steps of an attempt pay for kernel selection and allocator warm-up (2-3x a normal step on
# CPU); left in, they inflate epoch 1's step time, and every forecast made from it, for short epochs.
WARMUP_STEPS = 3


def recent_step_seconds(walls: Sequence[float]) -> float:
    """What the next steps will take: the mean of the latest quarter of the steps (at least 20), without
    their slowest tenth. A first epoch speeds up as it goes (allocator and caches warming up), so its
    last steps predict the next epochs better than its mean; and a one-off stall (a flush, a GC pause)
    is not a trend."""
    recent = sorted(walls[-max(20, len(walls) // 4):])
    kept = recent[: max(1, len(recent) - len(recent) // 10)]
    return statistics.fmean(kept)


def system_clock() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class BudgetGauge:
    """A budget whose thresholds the meter reports: what everything but this attempt already uses."""

    scope: str
    period: str
    amount_usd: float
    used_usd: float


@dataclass(frozen=True)
class ForecastPoint:
    step: int
    epoch: float  # fractional: 0.4 = 40% through epoch 1
    accrued_usd: float  # the run so far, earlier attempts included
    forecast_usd: float  # the run's expected total
    basis: str  # "steps" (within an epoch) or "epochs" (at an epoch's end)
    epoch_usd: float | None = None  # at an epoch's end: what that epoch cost on its own


@dataclass(frozen=True)
class CostEvent:
    name: str  # oppen.cost.threshold | oppen.budget.stopped | oppen.training.slow (oppen/events.py)
    payload: dict


@dataclass
class MeterTotals:
    """This attempt's charges."""

    usd: float = 0.0
    peak_seconds: float = 0.0
    off_peak_seconds: float = 0.0
    on_demand_usd: float = 0.0
    usd_by_month: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def seconds(self) -> float:
        return self.peak_seconds + self.off_peak_seconds


@dataclass
class _Timing:
    step_walls: list[float] = field(default_factory=list)  # this epoch's step-to-step intervals
    last_epoch_step_seconds: float | None = None
    last_step_end: float | None = None  # monotonic
    epoch_overheads: list[float] = field(default_factory=list)
    pending_overhead_from: float | None = None  # last step end of an ended epoch, until the next step
    provisional_overhead: float | None = None


class CostMeter(Callback):
    def __init__(
        self,
        book: PriceBook,
        resources: Resources,
        *,
        spot: bool = False,
        hold_usd: float | None = None,
        cap_usd: float | None = None,
        prior_usd: float = 0.0,
        budgets: Sequence[BudgetGauge] = (),
        extend: Extend | None = None,
        expected_step_seconds: float | None = None,
        expected_epoch_overhead_seconds: float = 0.0,
        tail_seconds: float = 0.0,
        tail_reserve_seconds: float = 0.0,
        safety_steps: float = 1.0,
        clock: Clock | None = None,
        monotonic: Monotonic | None = None,
        start: float | None = None,
        on_event: Callable[[CostEvent], None] | None = None,
        on_forecast: Callable[[ForecastPoint], None] | None = None,
        forecasts_per_epoch: int = 10,
        thresholds: tuple[float, ...] = THRESHOLDS,
        slow_factor: float | None = None,
    ) -> None:
        self.book, self.resources, self.spot = book, resources, spot
        self._prices = PriceCursor(book, resources, spot)
        self.cap_usd = cap_usd  # the run's cap over all its attempts
        self.prior_usd = prior_usd  # what the run's earlier attempts spent
        # This attempt may spend at most its hold; without one, whatever the cap has left.
        self.limit_usd = hold_usd if hold_usd is not None else (cap_usd - prior_usd if cap_usd is not None else None)
        self.budgets = tuple(budgets)
        self.extend = extend
        self.expected_step_seconds = expected_step_seconds
        self.expected_epoch_overhead_seconds = expected_epoch_overhead_seconds
        # After training: the expected tail (forecasts) and the padded one kept inside the hold.
        self.tail_seconds = tail_seconds
        self.tail_reserve_seconds = max(tail_reserve_seconds, tail_seconds)
        self.safety_steps = safety_steps
        self.clock = clock or system_clock
        # A fake wall clock (tests) also serves as the monotonic one; the real one never does.
        self.monotonic = monotonic or (time.monotonic if clock is None else (lambda: self.clock().timestamp()))
        self.on_event = on_event
        self.on_forecast = on_forecast
        self.forecasts_per_epoch = forecasts_per_epoch
        self.thresholds = thresholds
        # An epoch over slow_factor x what the speed history expects is reported once (None: the
        # expectation is a calibration's, too rough to call a run slow against).
        self.slow_factor = slow_factor
        self.reported_slow = False
        self._epoch_start_step = 0
        # Billing starts here; a flow passes the moment it got its GPU slots.
        self._last_mono = start if start is not None else self.monotonic()
        self.totals = MeterTotals()
        self.timing = _Timing()
        self.info: RunInfo | None = None
        self.forecasts: list[ForecastPoint] = []
        self.events: list[CostEvent] = []
        self.epoch_costs: list[tuple[int, float]] = []  # (epoch, the run's cumulative USD at its end)
        self.step_costs: list[float] = []  # USD of each step this meter saw, for overshoot reporting
        self.training_usd_at_start: float | None = None
        self.training_usd_at_end: float | None = None
        self.seconds_at_train_start: float | None = None
        self.seconds_at_train_end: float | None = None
        self.stopped_for_cap: str | None = None
        self.limited_by: str | None = None  # what the hold could not be extended past
        self.tail_reserve_usd = 0.0  # priced when the limit stops the run
        self.epoch_ends_done = 0
        self._step_started_usd = 0.0
        self._epoch_started_run_usd = prior_usd
        self._attempt_steps = 0
        self._estimate: tuple[int, float] | None = None  # (walls seen, estimate)

    # --- accrual -------------------------------------------------------------------------

    def tick(self) -> datetime:
        """Charge the time since the last tick at the prices in force over it; returns the wall time now."""
        mono = self.monotonic()
        end = self.clock()
        seconds = mono - self._last_mono
        if seconds > 0:
            before = self.totals.usd
            for month, begin, upto in utc_month_slices(end - timedelta(seconds=seconds), end):
                cost = self._prices.price(begin, upto)
                self.totals.usd += cost.usd
                self.totals.usd_by_month[month] += cost.usd
                self.totals.peak_seconds += cost.peak_seconds
                self.totals.off_peak_seconds += cost.off_peak_seconds
                self.totals.on_demand_usd += cost.on_demand_usd
            self._last_mono = mono
            self._check_thresholds(before, self.totals.usd)
        return end

    def price(self, start: datetime, seconds: float) -> float:
        return self._prices.price(start, at(start, seconds)).usd

    @property
    def accrued_usd(self) -> float:
        """This attempt's charges so far."""
        return self.totals.usd

    @property
    def run_usd(self) -> float:
        """The run's charges so far, earlier attempts included."""
        return self.prior_usd + self.totals.usd

    # --- estimates -----------------------------------------------------------------------

    def step_seconds_estimate(self) -> float | None:
        walls = self.timing.step_walls
        if len(walls) >= 3:
            # Refreshed every 16 steps: the stop rule asks every step, and a sort per step is wasted work.
            if self._estimate is None or len(walls) < self._estimate[0] or len(walls) - self._estimate[0] >= 16 \
                    or len(walls) < 32:
                self._estimate = (len(walls), recent_step_seconds(walls))
            return self._estimate[1]
        if self.timing.last_epoch_step_seconds is not None:
            return self.timing.last_epoch_step_seconds
        return self.expected_step_seconds

    def epoch_overhead_estimate(self) -> float:
        if self.timing.epoch_overheads:
            return self.timing.epoch_overheads[-1]
        if self.timing.provisional_overhead is not None:
            return self.timing.provisional_overhead
        return self.expected_epoch_overhead_seconds

    def remaining_seconds(self, step: int) -> float | None:
        """Training left from `step` on (steps and epoch ends), without the tail; None before any estimate."""
        step_seconds = self.step_seconds_estimate()
        if self.info is None or step_seconds is None:
            return None
        return remaining_seconds(
            steps_done=step, total_steps=self.info.total_steps, steps_per_epoch=self.info.steps_per_epoch,
            step_seconds=step_seconds, epoch_overhead_seconds=self.epoch_overhead_estimate(),
            epoch_ends_done=self.epoch_ends_done,
        )

    def forecast_now(self, now: datetime, step: int, basis: str, epoch_usd: float | None = None) -> ForecastPoint | None:
        left = self.remaining_seconds(step)
        if left is None or self.info is None:
            return None
        point = ForecastPoint(
            step=step,
            epoch=step / self.info.steps_per_epoch,
            accrued_usd=self.run_usd,
            # The expected tail, not the padded reserve: a forecast is a best guess, the cap a ceiling.
            forecast_usd=forecast_total_usd(self.run_usd, now, left + self.tail_seconds, self.price),
            basis=basis,
            epoch_usd=epoch_usd,
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
        self.training_usd_at_end = self.seconds_at_train_end = None  # training (again, after a reclaim) under way
        # A resumed attempt (after a reclaim) starts a fresh epoch timing; epochs already ended stay counted.
        self.epoch_ends_done = info.start_step // info.steps_per_epoch
        self.timing.step_walls = []
        self.timing.last_step_end = None
        self.timing.pending_overhead_from = None
        self._attempt_steps = 0
        self._epoch_start_step = info.start_step
        self._epoch_started_run_usd = self.run_usd  # an epoch's own cost is counted from here
        if info.start_step:
            self.reported_slow = True  # a resumed epoch's time is partial: not comparable with the history

    def on_step_begin(self, step: StepInfo, control: LoopControl) -> None:
        now = self.tick()
        self._close_epoch_overhead(self._last_mono)
        self._step_started_usd = self.totals.usd
        if self.limit_usd is None:
            return
        step_seconds = self.step_seconds_estimate() or 0.0
        ends_epoch = step.batch_in_epoch == step.steps_per_epoch or step.step == step.total_steps
        unit_usd = self.price(now, next_step_seconds(step_seconds, ends_epoch, self.epoch_overhead_estimate()))
        # One more step of margin: a step that runs long must still end inside the hold.
        margin_usd = self.safety_steps * self.price(now, step_seconds)
        tail_usd = self.price(now, self.tail_reserve_seconds)
        needed = self.totals.usd + unit_usd + margin_usd + tail_usd
        if needed > self.limit_usd:
            self._ask_for_more(now, step.step, needed)
            self.tick()  # the top-up took time (a busy ledger), and that time is billed: check again with it
        if would_cross_cap(self.totals.usd, unit_usd + margin_usd + tail_usd, self.limit_usd):
            self._stop(control, step, unit_usd, tail_usd)

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        now = self.tick()
        mono = self._last_mono
        self.step_costs.append(self.totals.usd - self._step_started_usd)
        self._attempt_steps += 1
        warming_up = self._attempt_steps <= WARMUP_STEPS and step.steps_per_epoch > 10 * WARMUP_STEPS
        if warming_up:
            pass  # not representative of the run's speed (see WARMUP_STEPS); still billed, as every step
        elif self.timing.last_step_end is not None:
            self.timing.step_walls.append(mono - self.timing.last_step_end)
        elif step.step_seconds is not None:
            self.timing.step_walls.append(step.step_seconds)  # first step of an attempt: its own compute time
        self.timing.last_step_end = mono
        if self.info is not None:
            # Through every epoch, not only the first: the accrued cost is drawn from start to end.
            every = max(1, self.info.steps_per_epoch // self.forecasts_per_epoch)
            if step.step % every == 0 and len(self.timing.step_walls) >= 3:
                self.forecast_now(now, step.step, "steps")

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        now = self.tick()
        if self.timing.step_walls:
            self.timing.last_epoch_step_seconds = recent_step_seconds(self.timing.step_walls)
        if self.timing.last_step_end is not None:
            # Validation + checkpoint so far; the full gap is measured when the next step starts.
            self.timing.provisional_overhead = self._last_mono - self.timing.last_step_end
            self.timing.pending_overhead_from = self.timing.last_step_end
        self.timing.step_walls = []
        self.timing.last_step_end = None
        self.epoch_ends_done += 1
        epoch_usd = self.run_usd - self._epoch_started_run_usd
        self._epoch_started_run_usd = self.run_usd
        self.epoch_costs.append((epoch.epoch, self.run_usd))
        self._check_slow(epoch)
        self.forecast_now(now, epoch.step, "epochs", epoch_usd=epoch_usd)

    def on_train_end(self, result: TrainResult, control: LoopControl) -> None:
        self.tick()
        self._close_epoch_overhead(self._last_mono)
        if self.training_usd_at_end is None:  # set already when the limit stopped the run (see _stop)
            self.training_usd_at_end = self.totals.usd
            self.seconds_at_train_end = self.totals.seconds

    def _close_epoch_overhead(self, mono: float) -> None:
        """The gap from an epoch's last step to the next step (or the end) is that epoch's overhead."""
        if self.timing.pending_overhead_from is not None:
            self.timing.epoch_overheads.append(mono - self.timing.pending_overhead_from)
            self.timing.pending_overhead_from = None

    # --- the hold ------------------------------------------------------------------------

    def _ask_for_more(self, now: datetime, step: int, needed_usd: float) -> None:
        """Top the hold up: to the forecast total plus 10% (so this is rare), at least what the next step needs."""
        if self.extend is None:
            return
        left = self.remaining_seconds(step - 1) or 0.0
        forecast = self.totals.usd + self.price(now, left + self.tail_reserve_seconds)
        wanted = max(needed_usd, 1.1 * forecast, 1.25 * self.limit_usd)
        self.limit_usd, self.limited_by = self.extend(wanted)

    def _stop(self, control: LoopControl, step: StepInfo, unit_usd: float, tail_usd: float) -> None:
        self.tail_reserve_usd = tail_usd
        # Training ends here, at the step it will not take. What follows (the checkpoint the run resumes
        # from, the test pass, logging the model) is the tail that the reserve was kept back for, and the
        # rule above is what guarantees that this figure plus the reserve fits the limit.
        self.training_usd_at_end = self.totals.usd
        self.seconds_at_train_end = self.totals.seconds
        why = self.limited_by or ("the run's max_cost_usd" if self.cap_usd is not None else "its hold")
        earlier = f"; earlier attempts spent ${self.prior_usd:.6f}" if self.prior_usd else ""
        self.stopped_for_cap = (
            f"budget cap reached before step {step.step}/{step.total_steps} (limited by {why}): this attempt "
            f"may spend ${self.limit_usd:.6f} and has spent ${self.totals.usd:.6f}{earlier}; the next step would "
            f"cost ~${unit_usd:.6f} and ${tail_usd:.6f} is kept for evaluating and logging the model"
        )
        self._emit("oppen.budget.stopped", {
            "reason": self.stopped_for_cap, "cost_usd": self.run_usd, "limit_usd": self.limit_usd, "limited_by": why, "cap_usd": self.cap_usd, "accrued_usd": self.run_usd,
            "attempt_usd": self.totals.usd, "step": step.step, "total_steps": step.total_steps,
            "next_step_usd": unit_usd, "tail_reserve_usd": tail_usd,
        })
        control.request_stop(self.stopped_for_cap)

    def _check_slow(self, epoch: EpochRecord) -> None:
        steps = epoch.step - self._epoch_start_step
        self._epoch_start_step = epoch.step
        if self.slow_factor is None or self.reported_slow or not self.expected_step_seconds or steps <= 0:
            return
        expected = steps * self.expected_step_seconds + self.expected_epoch_overhead_seconds
        if epoch.epoch_seconds > self.slow_factor * expected:
            self.reported_slow = True
            self._emit("oppen.training.slow", {
                "epoch": epoch.epoch, "epoch_seconds": epoch.epoch_seconds, "expected_seconds": expected,
                "ratio": epoch.epoch_seconds / expected, "steps": steps,
            })

    # --- thresholds ----------------------------------------------------------------------

    def _bases(self) -> list[tuple[str, float, float]]:
        """(name, amount, used by everything but this attempt) for the run's cap and each budget."""
        bases = [("cap", self.cap_usd, self.prior_usd)] if self.cap_usd else []
        return bases + [(gauge.scope, gauge.amount_usd, gauge.used_usd) for gauge in self.budgets if gauge.amount_usd > 0]

    def _check_thresholds(self, before: float, after: float) -> None:
        for name, amount, used in self._bases():
            for fraction in crossed_thresholds((used + before) / amount, (used + after) / amount, self.thresholds):
                self._emit("oppen.cost.threshold", self._threshold_payload(fraction, name, amount, after))

    def _threshold_payload(self, fraction: float, name: str, amount: float, attempt_usd: float) -> dict:
        run_usd = self.prior_usd + attempt_usd
        return {
            "fraction": fraction, "of": name, "of_usd": amount, "accrued_usd": run_usd, "attempt_usd": attempt_usd,
            "cap_usd": self.cap_usd, "cap_fraction": run_usd / self.cap_usd if self.cap_usd else None,
            "budgets": [
                {"scope": gauge.scope, "period": gauge.period, "amount_usd": gauge.amount_usd,
                 "used_usd": gauge.used_usd + attempt_usd, "fraction": (gauge.used_usd + attempt_usd) / gauge.amount_usd}
                for gauge in self.budgets if gauge.amount_usd > 0
            ],
        }

    def _emit(self, name: str, payload: dict) -> None:
        event = CostEvent(name, payload)
        self.events.append(event)
        if self.on_event:
            self.on_event(event)
