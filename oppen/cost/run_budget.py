"""One owner for an attempt's money: reserve → meter → settle, settling exactly once on every exit.

    with RunBudget(...) as budget:          # billing starts at `billing_from` (when the GPUs were held)
        budget.reserve(quote)               # a hold against every budget, or BudgetRefused
        train(..., callbacks=[budget.meter])
        budget.complete(Outcome(...))       # the normal end: settled, or stopped at the cap
    budget.settled                          # what was booked (and published)

Leaving the block settles the attempt: as completed or stopped when `complete` was called, as
`preempted` when the exception is an eviction (`is_preemption`), else as `failed`. The
settlement is journalled to disk first, then booked in the ledger (idempotent per attempt id,
retried while the ledger is unreachable, with SIGTERM held off), then published (MLflow, the
artifacts) by an injected callable whose failures never touch the ledger again. If the ledger
stays unreachable, the entry waits in the journal for `oppen ledger reconcile`, and the hold's
expiry charges the run meanwhile (which the reconcile then replaces with the real cost).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import InterfaceError, OperationalError

from oppen.cost.journal import JournalEntry, SettlementJournal
from oppen.cost.ledger import Ledger, LedgerError, Reservation, Settlement
from oppen.cost.meter import BudgetGauge, CostEvent, CostMeter, ForecastPoint
from oppen.cost.money import format_usd, to_micros, usd_float
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import PriceBook
from oppen.cost.quote import Quote
from oppen.cost.settlement import RunCost, settle_from_meter
from oppen.cost.utilization import Utilization
from oppen.signals import deferred_sigterm

# What "the ledger is down" looks like from SQLAlchemy (and the OS): worth retrying, and journalling.
TRANSIENT = (OperationalError, InterfaceError, ConnectionError, TimeoutError)
LEDGER_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)  # ~7.5 s: inside Kubernetes' 30 s grace period after SIGTERM


SLOW_FACTOR = 2.0  # an epoch over twice its history's time is reported (oppen.training.slow)


class BudgetRefused(RuntimeError):
    """The run's quote does not fit its budgets or its cap; nothing was trained."""


class LedgerUnavailable(RuntimeError):
    """The ledger could not be reached to reserve: the run did not start, so nothing was spent."""


def tail_reserve_seconds(quote: Quote) -> float:
    """The tail varies by seconds from run to run (model logging, registry writes); the hold is a
    ceiling, so it keeps back 1.5x the estimate plus a second rather than the median alone."""
    return 1.5 * quote.speed.tail_seconds + 1.0


def hold_usd(quote: Quote) -> float:
    """What an attempt holds: the p90 quote, plus what the meter keeps in reserve beyond the expected
    tail and one step of margin, so a run on its quote never needs a top-up."""
    step_seconds = quote.speed.seconds_per_sample * quote.shape.batch_size
    extra_seconds = tail_reserve_seconds(quote) - quote.speed.tail_seconds + step_seconds
    return quote.p90_usd + quote.hourly_usd / 3600 * extra_seconds


def least_hold_micros(quote: Quote, spent_seconds: float) -> int:
    """What an attempt must be able to spend to end well: what it has spent already (loading, quoting), the
    expected tail (test pass, model logging) and two steps. A run's cap with less left than this refuses
    the attempt, rather than let it start, stop at once and overspend the cap by its tail."""
    step_seconds = quote.speed.seconds_per_sample * quote.shape.batch_size
    seconds = spent_seconds + quote.speed.tail_seconds + 2 * step_seconds
    return to_micros(quote.hourly_usd / 3600 * seconds)


def hold_duration(quote: Quote) -> timedelta:
    """How long a hold lives without a settle: 3x the p90 duration plus an hour, at most the ledger's maximum."""
    return timedelta(seconds=min(3 * quote.p90_seconds + 3600, 90 * 86400))


@dataclass(frozen=True)
class Outcome:
    """How a run that finished normally ended: what it scored, and why it stopped if it stopped early."""

    stopped: bool
    metric_name: str | None
    metric_value: float | None
    higher_is_better: bool = True
    baseline: float | None = None
    utilization: Utilization | None = None
    spot_lost_seconds: float = 0.0
    spot_interruptions: int = 0
    stop_reason: str | None = None


@dataclass(frozen=True)
class SettledCost:
    cost: RunCost
    settlement: Settlement | None  # None: the ledger could not be reached; the entry waits in the journal
    journal_path: str | None
    pending_reason: str | None = None

    @property
    def pending(self) -> bool:
        return self.settlement is None


class RunBudget:
    def __init__(
        self,
        *,
        ledger: Ledger,
        book: PriceBook,
        policy: CostPolicy,
        experiment: str,
        workload: str,
        run_key: str,
        attempt_id: str,
        journal: SettlementJournal,
        billing_from: float | None = None,
        mlflow_run_id: str | None = None,
        on_event: Callable[[CostEvent], None] | None = None,
        on_forecast: Callable[[ForecastPoint], None] | None = None,
        publish: Callable[[SettledCost], None] | None = None,
        is_preemption: Callable[[BaseException], bool] = lambda error: False,
        retry_delays: tuple[float, ...] = LEDGER_RETRY_DELAYS,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ledger, self.book, self.policy = ledger, book, policy
        self.experiment, self.workload, self.run_key, self.attempt_id = experiment, workload, run_key, attempt_id
        self.journal = journal
        self.billing_from = billing_from if billing_from is not None else monotonic()
        self.mlflow_run_id = mlflow_run_id
        self.on_event, self.on_forecast, self.publish = on_event, on_forecast, publish
        self.is_preemption = is_preemption
        self.retry_delays = retry_delays
        self.logger = logger or logging.getLogger("oppen.cost")
        self.monotonic, self.sleep = monotonic, sleep
        self.quote: Quote | None = None
        self.reservation: Reservation | None = None
        self.meter: CostMeter | None = None
        self.outcome: Outcome | None = None
        self.settled: SettledCost | None = None

    # --- the lifecycle -------------------------------------------------------------------

    def __enter__(self) -> RunBudget:
        return self

    def reserve(self, quote: Quote) -> Reservation:
        """Hold the p90 quote (never more than the run's cap has left) against every budget, or refuse."""
        self.quote = quote
        cap = to_micros(self.policy.max_cost_usd, ceiling=True) if self.policy.max_cost_usd is not None else None
        # A SIGTERM between the ledger's commit and our noting the hold would orphan the hold until it expires.
        with deferred_sigterm():
            try:
                reservation = self.ledger.reserve(
                    team=self.policy.team, experiment=self.experiment, run_key=self.run_key,
                    attempt_id=self.attempt_id, quote_micros=to_micros(quote.expected_usd),
                    hold_micros=to_micros(hold_usd(quote)), cap_micros=cap, min_hold_micros=self._least_hold(quote),
                    hold_for=hold_duration(quote), workload=self.workload, mlflow_run_id=self.mlflow_run_id,
                )
            except TRANSIENT as error:
                raise LedgerUnavailable(
                    f"the budget ledger cannot be reached, so the run was not started: {error}") from error
            self.reservation = reservation
            if reservation.accepted:
                self.meter = self._make_meter(quote, reservation)
        if not reservation.accepted:
            raise BudgetRefused(f"refused before training: {reservation.reason}")
        return reservation

    def complete(self, outcome: Outcome) -> None:
        """The run ended normally; leaving the block settles it as `settled`, or `stopped` at its cap."""
        self.outcome = outcome

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.reservation is None or not self.reservation.accepted or self.settled is not None:
            return False
        status = self._status_for(exc)
        # From the meter's last reading to the ledger's commit, a SIGTERM waits (a few seconds at most: the
        # ledger's retries); it is delivered when the booking is done, which may skip publishing. The next
        # attempt then publishes the run's total, which the ledger has.
        with deferred_sigterm():
            try:
                self.settled = self._book_attempt(status, exc)
            except Exception:  # a bug here must not hide why the run ended; the hold's expiry still charges it
                self.logger.exception("could not settle %s; its hold stays until it expires", self.attempt_id)
                return False
        self._publish(self.settled)
        return False

    def _least_hold(self, quote: Quote) -> int:
        return least_hold_micros(quote, spent_seconds=self.monotonic() - self.billing_from)

    # --- settling --------------------------------------------------------------------------

    def _status_for(self, exc: BaseException | None) -> str:
        if exc is None and self.outcome is not None:
            return "stopped" if self.outcome.stopped else "settled"
        if exc is not None and self.is_preemption(exc):
            return "preempted"
        return "failed"

    def _reason_for(self, status: str, exc: BaseException | None) -> str | None:
        if status == "preempted":
            return "SIGTERM: rescheduled, resumes from its last checkpoint"
        if status == "failed":
            return f"{type(exc).__name__}: {exc}"[:500] if exc is not None else "ended without reporting an outcome"
        return self.outcome.stop_reason if self.outcome else None

    def _book_attempt(self, status: str, exc: BaseException | None) -> SettledCost:
        """Read the meter, journal the settlement, book it in the ledger; (publishing comes after)."""
        outcome = self.outcome if status in ("settled", "stopped") else None
        cost = settle_from_meter(
            self.meter, status=status, resources=self.policy.resources, quote=self.quote,
            metric_name=outcome.metric_name if outcome else None, metric_value=outcome.metric_value if outcome else None,
            attempt=self.reservation.attempt_number, prior_micros=self.reservation.prior_micros,
            higher_is_better=outcome.higher_is_better if outcome else True, baseline=outcome.baseline if outcome else None,
            lost_seconds=outcome.spot_lost_seconds if outcome else 0.0,
            interruptions=outcome.spot_interruptions if outcome else 0,
            utilization=outcome.utilization if outcome else None, stop_reason=self._reason_for(status, exc),
        )
        entry = JournalEntry(
            attempt_id=self.attempt_id, run_key=self.run_key, team=self.policy.team, experiment=self.experiment,
            charges_by_month=cost.charges_micros, status=status, reason=cost.stop_reason,
            mlflow_run_id=self.mlflow_run_id,
            # What the reports read from the ledger alone (quality, utilisation), instead of an MLflow run each.
            detail={"gpu_hours": cost.gpu_hours, "cpu_hours": cost.cpu_hours, "metric": cost.metric_name,
                    "value": cost.metric_value, "attempt": cost.attempt, "seconds": cost.seconds,
                    "resources": self.policy.resources.model_dump(mode="json"), "utilization": cost.utilization},
        )
        path = self._journal(entry)
        settlement, problem = self._book(entry)
        if settlement is not None and path is not None:
            self.journal.done(self.attempt_id)
        if settlement is not None:
            cost = cost.with_run_total(settlement.run_spent_micros)
            # DEBUG: the flow's story says it to people (tasks/run_budget.py); this is for the engine's own log.
            self.logger.debug("settled %s: this attempt %s, the run %s (%s)", self.run_key,
                             format_usd(settlement.cost_micros), format_usd(settlement.run_spent_micros), status)
        return SettledCost(cost, settlement, str(path) if path and settlement is None else None, problem)

    def _journal(self, entry: JournalEntry):
        try:
            return self.journal.write(entry)
        except OSError as error:
            # Not fatal: the ledger write below is the record; the journal only covers its outage.
            self.logger.error("could not journal the settlement of %s (%s); booking it directly", self.attempt_id, error)
            return None

    def _book(self, entry: JournalEntry) -> tuple[Settlement | None, str | None]:
        """Book in the ledger, retrying while it is unreachable; (None, why) when it stays so."""
        for delay in (*self.retry_delays, None):
            try:
                return self.ledger.settle(
                    entry.attempt_id, charges_by_month=entry.charges_by_month, status=entry.status,
                    reason=entry.reason, mlflow_run_id=entry.mlflow_run_id, detail=entry.detail,
                ), None
            except TRANSIENT as error:
                if delay is None:
                    why = (f"the ledger could not be reached to settle {format_usd(entry.cost_micros)}: "
                           f"{type(error).__name__}; kept in the settlement journal for `oppen ledger reconcile`")
                    self.logger.error(why)
                    return None, why
                self.sleep(delay)
            except LedgerError as error:
                self.logger.error("the ledger refused the settlement of %s: %s", entry.attempt_id, error)
                return None, f"the ledger refused the settlement: {error}"
        raise AssertionError("unreachable")

    def _publish(self, settled: SettledCost) -> None:
        if self.publish is None:
            return
        try:
            self.publish(settled)
        except Exception as error:  # MLflow or the artifact API down: the ledger already has the money
            self.logger.error("cost of %s is in the ledger but could not be published: %s", self.run_key, error)

    # --- the meter ---------------------------------------------------------------------------

    def _make_meter(self, quote: Quote, reservation: Reservation) -> CostMeter:
        speed = quote.speed
        return CostMeter(
            self.book, self.policy.resources, spot=self.policy.spot,
            hold_usd=usd_float(reservation.held_micros),
            cap_usd=self.policy.max_cost_usd, prior_usd=usd_float(reservation.prior_micros),
            budgets=[BudgetGauge(use.scope, use.period, usd_float(use.amount_micros), usd_float(use.used_micros))
                     for use in reservation.budgets],
            extend=self._extend,
            expected_step_seconds=speed.seconds_per_sample * quote.shape.batch_size,
            expected_epoch_overhead_seconds=speed.epoch_overhead_seconds,
            tail_seconds=speed.tail_seconds,
            tail_reserve_seconds=tail_reserve_seconds(quote),
            start=self.billing_from, monotonic=self.monotonic,
            on_event=self.on_event, on_forecast=self.on_forecast,
            # "Slow" is measured against this request's own history, never against a short calibration.
            slow_factor=SLOW_FACTOR if speed.source == "history" else None,
        )

    def _extend(self, wanted_usd: float) -> tuple[float, str | None]:
        current = self.meter.limit_usd if self.meter else 0.0
        try:
            grant = self.ledger.extend(self.attempt_id, to_micros(wanted_usd), hold_for=hold_duration(self.quote))
        except TRANSIENT:
            return current, "the ledger, which could not be reached to extend the hold"
        if grant.added_micros:
            self.logger.info("hold topped up by %s to %s", format_usd(grant.added_micros), format_usd(grant.held_micros))
        return usd_float(grant.held_micros), grant.limited_by
