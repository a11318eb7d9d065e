"""RunBudget, the one owner of an attempt's money: every exit settles exactly once, and the ledger agrees with the meter.

A fake monotonic clock drives the real CostMeter through a small fake loop, and `sleep` is
recorded instead of waited, so nothing here waits. Prices come from the wall clock, so the
book has no off-peak discount: a test run at 21:59 UTC charges what one at noon does.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy.exc import OperationalError

from oppen.cost.journal import SettlementJournal
from oppen.cost.ledger import Ledger, utcnow
from oppen.cost.meter import CostMeter
from oppen.cost.money import to_micros, usd_float
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import OffPeak, PriceBook, Resources
from oppen.cost.quote import Quote, make_quote
from oppen.cost.reconcile import reconcile
from oppen.cost.run_budget import BudgetRefused, Outcome, RunBudget, SettledCost, hold_duration, hold_usd
from oppen.cost.speed import RunShape, from_calibration
from training.callbacks import LoopControl, RunInfo, StepInfo
from training.results import EpochRecord, TrainResult

BOOK = PriceBook(off_peak=OffPeak(discount=0.0))  # one price all day: the meter prices by the real wall clock
GPU = Resources(gpus=1, cpu_cores=4)  # $0.45 per hour: 125 micro-dollars per second
STEP_S, EVAL_S, TAIL_S = 10.0, 20.0, 30.0
TOTAL_STEPS, PER_EPOCH = 40, 10  # 510 s expected: $0.06375, held ~$0.0752


class Preempted(Exception):
    """What a SIGTERM handler raises when the node is reclaimed."""


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingLedger(Ledger):
    """The real ledger; `settle` fails with a connection error `failures` times first, and every call is counted."""

    def __init__(self, url: str, failures: int = 0) -> None:
        super().__init__(url)
        self.failures, self.settle_calls = failures, 0

    def settle(self, attempt_id, **kw):
        self.settle_calls += 1
        if self.failures:
            self.failures -= 1
            raise OperationalError("UPDATE oppen_attempts", None, ConnectionRefusedError("ledger down"))
        return super().settle(attempt_id, **kw)


@pytest.fixture
def url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.create_schema()
    ledger.upsert_team("ml")
    ledger.set_budget("ml", 10.0, "total")
    ledger.dispose()
    return url


@pytest.fixture
def quote() -> Quote:
    speed = from_calibration([STEP_S] * 5, batch_size=32, eval_seconds=EVAL_S, fixed_overhead_seconds=0.0,
                             tail_seconds=TAIL_S)
    return make_quote(BOOK, GPU, speed, RunShape(total_steps=TOTAL_STEPS, steps_per_epoch=PER_EPOCH, batch_size=32),
                      utcnow())


class Harness:
    """One run's ledger, journal, clock and recorded side effects."""

    def __init__(self, url: str, journal_dir, failures: int = 0) -> None:
        self.ledger = CountingLedger(url, failures)
        self.journal = SettlementJournal(journal_dir)
        self.mono = FakeMonotonic()
        self.sleeps: list[float] = []
        self.published: list[SettledCost] = []

    def budget(self, run_key: str = "run-1", attempt_id: str | None = None, cap: float | None = None,
               publish=None, retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0)) -> RunBudget:
        capped = {"max_cost_usd": cap} if cap is not None else {}  # the policy wants the field left out, not None
        return RunBudget(
            ledger=self.ledger, book=BOOK, policy=CostPolicy(team="ml", resources=GPU, **capped),
            experiment="mnist", workload="fake", run_key=run_key, attempt_id=attempt_id or f"{run_key}#1",
            journal=self.journal, publish=publish or self.published.append,
            is_preemption=lambda error: isinstance(error, Preempted), retry_delays=retry_delays,
            monotonic=self.mono, sleep=self.sleeps.append,
        )

    def train(self, meter: CostMeter, *, start_step: int = 0, raise_at: int | None = None,
              error: BaseException | None = None) -> LoopControl:
        """The callbacks as train() calls them, then the tail (test pass, model logging); raises `error` at a step."""
        control = LoopControl()
        meter.on_train_start(RunInfo("fake", "cpu", TOTAL_STEPS, PER_EPOCH, TOTAL_STEPS // PER_EPOCH, 32, start_step, {}),
                             control)
        done = start_step
        for step in range(start_step + 1, TOTAL_STEPS + 1):
            epoch, batch = (step - 1) // PER_EPOCH + 1, (step - 1) % PER_EPOCH + 1
            meter.on_step_begin(StepInfo(step, epoch, batch, PER_EPOCH, TOTAL_STEPS, 32), control)
            if control.should_stop:
                break
            if step == raise_at:
                self.mono.advance(STEP_S / 2)
                raise error
            self.mono.advance(STEP_S)
            meter.on_step_end(StepInfo(step, epoch, batch, PER_EPOCH, TOTAL_STEPS, 32, 1.0, STEP_S), control)
            done = step
            if batch == PER_EPOCH:
                self.mono.advance(EVAL_S)
                meter.on_epoch_end(EpochRecord(epoch=epoch, step=step, train_loss=1.0, metrics={}, epoch_seconds=1.0,
                                               samples_per_second=1.0), control)
        meter.on_train_end(TrainResult(
            workload="fake", device="cpu", steps=done, total_steps=TOTAL_STEPS, samples_seen=done * 32,
            epochs_completed=done // PER_EPOCH, resumed_from_step=start_step, stopped_early=done < TOTAL_STEPS,
            stop_reason=control.stop_reason, train_seconds=1.0, samples_per_second=1.0, final_train_loss=1.0, history=[],
            val_metrics={}, checkpoint_path=None, num_parameters=1), control)
        self.mono.advance(TAIL_S)
        return control

    def run(self, budget: RunBudget, quote: Quote, **train) -> RunBudget:
        """reserve → train → complete inside the block; exceptions from `train` leave the block as they would."""
        with budget:
            budget.reserve(quote)
            control = self.train(budget.meter, **train)
            budget.complete(Outcome(stopped=control.should_stop, metric_name="accuracy", metric_value=0.9,
                                    stop_reason=control.stop_reason))
        return budget

    def booked(self, run_key: str = "run-1") -> dict[str, int]:
        """The run's charges in the ledger, per month (all usage charges, never an expiry one)."""
        rows = self.ledger.charges_of(run_key)
        assert all(row["kind"] == "usage" for row in rows)
        totals: dict[str, int] = {}
        for row in rows:
            totals[row["month"]] = totals.get(row["month"], 0) + int(row["amount_micros"])
        return totals

    def spent(self, run_key: str = "run-1") -> int:
        return next(int(row["spent_micros"]) for row in self.ledger.rows(team="ml") if row["run_key"] == run_key)


def _assert_settled_once(h: Harness, budget: RunBudget, status: str) -> int:
    settled = budget.settled
    charged = settled.cost.charges_micros
    cost = sum(charged.values())
    assert cost > 0 and not settled.pending and settled.journal_path is None
    assert settled.settlement.status == status and not settled.settlement.replayed
    assert settled.settlement.cost_micros == cost == settled.cost.attempt_cost_micros
    assert h.ledger.settle_calls == 1 and h.published == [settled]
    [attempt] = h.ledger.attempts_of("run-1")
    assert (attempt["status"], int(attempt["cost_micros"]), int(attempt["held_micros"])) == (status, cost, 0)
    assert h.booked() == charged and h.spent() == cost
    assert h.ledger.usage("ml") == (cost, 0)  # the hold is released, only the metered cost stays
    assert list(h.journal.pending()) == []
    budget.__exit__(None, None, None)  # leaving twice (a nested cleanup) books nothing more
    assert h.ledger.settle_calls == 1
    return cost


@pytest.mark.parametrize("ending, status", [
    ("completes", "settled"), ("hits its cap", "stopped"), ("raises", "failed"), ("is preempted", "preempted"),
])
def test_leaving_the_block_settles_exactly_once_with_what_the_meter_measured(url, tmp_path, quote, ending, status):
    h = Harness(url, tmp_path / "journal")
    budget = h.budget(cap=0.03 if ending == "hits its cap" else None)
    error = {"raises": RuntimeError("loss is NaN"), "is preempted": Preempted("SIGTERM")}.get(ending)
    if error is None:
        h.run(budget, quote)
    else:
        with pytest.raises(type(error)):
            h.run(budget, quote, raise_at=15, error=error)
    cost = _assert_settled_once(h, budget, status)
    if status == "stopped":
        assert budget.meter.stopped_for_cap and cost <= to_micros(0.03)
        assert "budget cap reached" in h.ledger.attempts_of("run-1")[0]["reason"]
    if status == "settled":
        hours = (TOTAL_STEPS * STEP_S + TOTAL_STEPS // PER_EPOCH * EVAL_S + TAIL_S) / 3600
        assert cost == to_micros(0.45 * hours)  # 510 s of $0.45/h, to the micro-dollar


@pytest.mark.parametrize("run_fails", [False, True])
def test_a_failing_publish_neither_raises_nor_touches_the_ledger(url, tmp_path, quote, caplog, run_fails):
    h = Harness(url, tmp_path / "journal")

    def publish(settled: SettledCost) -> None:
        h.published.append(settled)
        raise ConnectionError("MLflow is down")

    budget = h.budget(publish=publish)
    if run_fails:
        with pytest.raises(RuntimeError, match="CUDA error"):  # the run's own error, not the publisher's
            h.run(budget, quote, raise_at=5, error=RuntimeError("CUDA error"))
    else:
        h.run(budget, quote)
    _assert_settled_once(h, budget, "failed" if run_fails else "settled")
    assert "could not be published: MLflow is down" in caplog.text


def test_a_refused_reservation_leaves_nothing_to_settle(tmp_path, quote):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.create_schema()
    ledger.upsert_team("ml")
    ledger.set_budget("ml", 0.05, "total")  # less than the ~$0.075 hold
    h = Harness(url, tmp_path / "journal")
    budget = h.budget()
    with pytest.raises(BudgetRefused, match="over budget"):
        h.run(budget, quote)
    assert budget.settled is None and budget.meter is None
    assert h.ledger.settle_calls == 0 and h.published == []
    [attempt] = h.ledger.attempts_of("run-1")
    assert attempt["status"] == "refused" and attempt["held_micros"] == 0 and attempt["cost_micros"] is None
    assert h.ledger.charges_of("run-1") == [] and h.ledger.usage("ml") == (0, 0)
    assert not (tmp_path / "journal").exists()


def test_a_brief_ledger_outage_at_settle_is_retried_and_booked_once(url, tmp_path, quote):
    h = Harness(url, tmp_path / "journal", failures=2)
    budget = h.run(h.budget(), quote)
    assert h.sleeps == [0.5, 1.0] and h.ledger.settle_calls == 3  # two back-offs, then the third try books it
    h.ledger.settle_calls = 1  # from here on, the same checks as an uneventful run
    _assert_settled_once(h, budget, "settled")


def _unreachable_for_good(url: str, tmp_path, quote: Quote) -> tuple[Harness, SettledCost]:
    h = Harness(url, tmp_path / "journal", failures=1_000)
    budget = h.run(h.budget(retry_delays=(0.5, 1.0)), quote)
    settled = budget.settled
    assert settled.pending and "oppen ledger reconcile" in settled.pending_reason
    assert h.sleeps == [0.5, 1.0] and h.ledger.settle_calls == 3
    assert os.path.exists(settled.journal_path) and h.published == [settled]
    [attempt] = h.ledger.attempts_of("run-1")
    assert attempt["status"] == "running" and h.ledger.charges_of("run-1") == []
    return h, settled


def test_an_outage_that_outlasts_the_retries_is_journalled_and_reconciled_exactly_once(url, tmp_path, quote):
    h, settled = _unreachable_for_good(url, tmp_path, quote)
    cost = settled.cost.attempt_cost_micros
    ledger = Ledger(url)  # back up
    [result] = reconcile(ledger, h.journal)
    assert (result.attempt_id, result.outcome, result.cost_micros) == ("run-1#1", "booked", cost)
    assert h.booked() == settled.cost.charges_micros and ledger.usage("ml") == (cost, 0)
    assert not os.path.exists(settled.journal_path)
    assert reconcile(ledger, h.journal) == []  # nothing left: a second reconcile books nothing
    assert ledger.usage("ml") == (cost, 0) and ledger.attempts_of("run-1")[0]["status"] == "settled"


def test_a_hold_that_expired_during_the_outage_is_replaced_by_the_real_cost(url, tmp_path, quote):
    h, settled = _unreachable_for_good(url, tmp_path, quote)
    cost = settled.cost.attempt_cost_micros
    held = h.ledger.attempts_of("run-1")[0]["held_micros"]
    ledger = Ledger(url)
    later = utcnow() + hold_duration(quote) + timedelta(minutes=1)
    assert ledger.expire_stale(now=later) == ["run-1#1"]
    assert ledger.usage("ml") == (held, 0) and held > cost  # meanwhile the run is charged its whole hold
    [result] = reconcile(ledger, h.journal, expire=False)
    assert (result.outcome, result.cost_micros) == ("replaced expiry", cost)
    assert h.booked() == settled.cost.charges_micros and ledger.usage("ml") == (cost, 0)
    assert h.spent() == cost
    assert reconcile(ledger, h.journal) == []


def test_a_rescheduled_attempt_may_spend_only_what_the_cap_has_left(url, tmp_path, quote):
    cap = to_micros(0.08)  # above the first hold (~$0.075), below two
    h = Harness(url, tmp_path / "journal")
    first = h.budget(cap=usd_float(cap))
    with pytest.raises(Preempted):
        h.run(first, quote, raise_at=26, error=Preempted("SIGTERM"))
    assert first.reservation.held_micros == to_micros(hold_usd(quote))  # the cap did not clamp the first hold
    prior = first.settled.cost.attempt_cost_micros
    second = h.budget(attempt_id="run-1#2", cap=usd_float(cap))
    with second:
        reservation = second.reserve(quote)
        assert (reservation.attempt_number, reservation.prior_micros, reservation.reused) == (2, prior, True)
        assert reservation.held_micros == cap - prior
        assert second.meter.limit_usd == usd_float(cap - prior) and second.meter.prior_usd == usd_float(prior)
        control = h.train(second.meter, start_step=25)
        second.complete(Outcome(stopped=control.should_stop, metric_name="accuracy", metric_value=0.9,
                                stop_reason=control.stop_reason))
    this = second.settled.cost.attempt_cost_micros
    assert second.settled.settlement.run_spent_micros == prior + this == second.settled.cost.run_cost_micros
    assert prior + this <= cap
    statuses = [(a["number"], a["status"], int(a["cost_micros"])) for a in h.ledger.attempts_of("run-1")]
    assert statuses == [(1, "preempted", prior), (2, second.settled.settlement.status, this)]
    assert h.spent() == prior + this == sum(h.booked().values())


class Terminated(BaseException):
    """Like Prefect's TerminationSignal: a BaseException, so no `except Exception` swallows it."""


@contextmanager
def _sigterm_raises(events: list[str]):
    """SIGTERM handled as Prefect's handler does (it raises), noting when it was handled."""
    def on_sigterm(signum, frame):
        events.append("SIGTERM handled")
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_during_the_booking_waits_until_the_booking_is_done(url, tmp_path, quote):
    events: list[str] = []

    class SignalledLedger(CountingLedger):
        def settle(self, attempt_id, **kw):
            events.append("booking starts")
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs handlers between bytecodes: this would land right here
            booked = super().settle(attempt_id, **kw)
            events.append("booked")
            return booked

    h = Harness(url, tmp_path / "journal")
    h.ledger = SignalledLedger(url)
    budget = h.budget()
    with _sigterm_raises(events), pytest.raises(Terminated):  # delivered, once, after the booking
        h.run(budget, quote)
    assert events == ["booking starts", "booked", "SIGTERM handled"]
    assert h.ledger.settle_calls == 1 and h.ledger.attempts_of("run-1")[0]["status"] == "settled"
    assert sum(h.booked().values()) > 0 and list(h.journal.pending()) == []


def test_a_sigterm_while_the_settlement_is_computed_waits_for_the_booking(url, tmp_path, quote, monkeypatch):
    import oppen.cost.run_budget as run_budget

    events: list[str] = []
    real = run_budget.settle_from_meter

    def signalled(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # lands between reading the meter and booking
        return real(*args, **kwargs)

    monkeypatch.setattr(run_budget, "settle_from_meter", signalled)
    h = Harness(url, tmp_path / "journal")
    budget = h.budget()
    with _sigterm_raises(events), pytest.raises(Terminated):
        h.run(budget, quote)
    assert events == ["SIGTERM handled"]
    [attempt] = h.ledger.attempts_of("run-1")
    assert attempt["status"] == "settled" and attempt["held_micros"] == 0  # booked, not orphaned
    assert h.spent() == budget.settled.cost.attempt_cost_micros > 0


def test_a_sigterm_right_after_the_reserve_commits_still_settles_the_hold(url, tmp_path, quote):
    events: list[str] = []

    class SignalledLedger(CountingLedger):
        def reserve(self, **kw):
            reservation = super().reserve(**kw)
            os.kill(os.getpid(), signal.SIGTERM)  # after the commit, before RunBudget keeps the reservation
            return reservation

    h = Harness(url, tmp_path / "journal")
    h.ledger = SignalledLedger(url)
    budget = h.budget()
    with _sigterm_raises(events), pytest.raises(Terminated):
        h.run(budget, quote)
    [attempt] = h.ledger.attempts_of("run-1")
    assert attempt["status"] == "failed" and attempt["held_micros"] == 0  # the hold was released, once
    assert h.ledger.settle_calls == 1


def test_an_attempt_the_cap_cannot_carry_to_its_end_is_refused_before_it_starts(url, tmp_path, quote):
    h = Harness(url, tmp_path / "journal")
    first = h.budget(cap=0.06)
    with pytest.raises(Preempted):
        h.run(first, quote, raise_at=34, error=Preempted("SIGTERM"))
    prior = first.settled.cost.attempt_cost_micros
    assert prior < to_micros(0.06)  # a little is left, but not enough for the tail the next attempt must pay
    second = h.budget(attempt_id="run-1#2", cap=0.06)
    with pytest.raises(BudgetRefused, match="less than this attempt needs"):
        with second:
            h.mono.advance(40.0)  # loading the data again: 40 s + the 30 s tail + 2 steps > what the cap has left
            second.reserve(quote)
    assert h.spent() == prior <= to_micros(0.06)  # the run never goes past its cap
    assert [a["status"] for a in h.ledger.attempts_of("run-1")] == ["preempted", "refused"]
