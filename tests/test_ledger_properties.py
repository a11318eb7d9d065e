"""Property tests of the budget ledger: any interleaving of reserves, top-ups, settles, retries and
expiries keeps every figure exact and every budget and cap respected.

A hypothesis state machine drives one ledger (SQLite, and PostgreSQL when OPPEN_TEST_POSTGRES_URL
is set) on a simulated clock that crosses a month boundary, and keeps a pure-Python model of what
each attempt held and booked. After every step the whole ledger is compared with the model and the
budget and cap invariants are checked. A failure prints the steps, each with a note of the ledger
call it made.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from oppen.cost.budgets import BudgetsFile, apply_budgets
from oppen.cost.ledger import MAX_HOLD, Ledger, LedgerError, month_of
from oppen.cost.ledger_schema import attempts as attempts_table
from oppen.cost.ledger_schema import charges as charges_table
from tests.postgres import postgres_schema

PG_ENV = "OPPEN_TEST_POSTGRES_URL"
RUNNING, REFUSED, EXPIRED = "running", "refused", "expired"
SETTLE_STATUSES = ("settled", "stopped", "failed", "preempted")
START = datetime(2026, 10, 31, 12, tzinfo=timezone.utc)  # half a day before a month boundary
WHERE = (("ml", "mnist"), ("ml", "lm"), ("cv", "det"))  # ml/mnist has its own budget besides the team's
HOLD_FOR = (timedelta(minutes=30), timedelta(hours=6), timedelta(days=3))
# Budgets are $0.50 to $1: two or three holds fill one, so refusals and limited top-ups happen. Round
# amounts besides arbitrary ones, because hypothesis draws mostly small integers.
HOLDS = st.sampled_from([0, 1, 100_000, 250_000, 400_000, 600_000]) | st.integers(0, 600_000)
TOP_UPS = st.sampled_from([-1, 0, 1]) | st.sampled_from([100_000, 300_000, 500_000]) | st.integers(1, 500_000)
CAPS = st.none() | st.sampled_from([300_000, 500_000, 800_000]) | st.integers(1, 800_000)
# Minutes to let pass before a step (13 hours from START is past midnight), or up to the next expiry
# of a running hold: exactly at it the hold still stands, a microsecond later it expires.
WAIT = st.sampled_from([0, 0, 5, 30, 60, 120, 13 * 60, "to an expiry", "past an expiry"])
PICK = st.integers(0, 255)  # which of the candidates (sorted by id) a rule acts on; each rule notes its choice

# 30 runs of up to 30 steps take about 8 s on SQLite (2 CPUs); PostgreSQL, slower per step, gets fewer.
SQLITE_SETTINGS = settings(max_examples=30, stateful_step_count=30, deadline=None, database=None,
                           suppress_health_check=[HealthCheck.too_slow])
POSTGRES_SETTINGS = settings(SQLITE_SETTINGS, max_examples=15)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _months(first: str, last: str) -> list[str]:
    """Every YYYY-MM from `first` to `last`, inclusive."""
    year, month = map(int, first.split("-"))
    months = [first]
    while months[-1] < last:
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
        months.append(f"{year:04d}-{month:02d}")
    return months


# --- the model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    team: str
    experiment: str  # "" for the team-wide budget
    amount: int
    period: str

    @property
    def scope(self) -> str:  # as the ledger names it in Grant.limited_by
        return f"experiment {self.team}/{self.experiment}" if self.experiment else f"team {self.team}"

    def covers(self, run: Run) -> bool:
        return run.team == self.team and self.experiment in ("", run.experiment)


@dataclass
class Attempt:
    id: str
    run_key: str
    number: int
    status: str
    held: int
    expires_at: datetime
    month: str  # reserved in
    hold_by_month: dict[str, int]  # its hold at the end of each month it ran in: what it may have spent by then
    charges: dict[str, int] = field(default_factory=dict)
    cost: int | None = None

    def may_have_spent_by(self, month: str) -> int:
        """The most a meter can have spent by the end of `month`: the hold it had then."""
        return max((held for m, held in self.hold_by_month.items() if m <= month), default=0)


@dataclass
class Run:
    key: str
    team: str
    experiment: str
    cap: int | None
    attempts: list[str] = field(default_factory=list)
    over: int = 0  # the over_hold_micros its settles recorded


@dataclass
class Model:
    """What the ledger should hold, computed in plain Python."""

    budgets: list[Budget] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)
    attempts: dict[str, Attempt] = field(default_factory=dict)

    def with_status(self, *statuses: str) -> list[Attempt]:
        return sorted((a for a in self.attempts.values() if a.status in statuses), key=lambda a: a.id)

    def run_of(self, attempt: Attempt) -> Run:
        return self.runs[attempt.run_key]

    def run_spent(self, run: Run) -> int:
        return sum(sum(self.attempts[a].charges.values()) for a in run.attempts)

    def run_held(self, run: Run) -> int:
        return sum(self.attempts[a].held for a in run.attempts if self.attempts[a].status == RUNNING)

    def in_scope(self, budget: Budget) -> list[Run]:
        return [run for run in self.runs.values() if budget.covers(run)]

    def spent(self, budget: Budget, month: str | None) -> int:
        return sum(amount for run in self.in_scope(budget) for a in run.attempts
                   for m, amount in self.attempts[a].charges.items() if month is None or m == month)

    def held(self, budget: Budget) -> int:
        return sum(self.run_held(run) for run in self.in_scope(budget))

    def used(self, budget: Budget, month: str) -> int:
        return self.spent(budget, month if budget.period == "monthly" else None) + self.held(budget)

    def budgets_of(self, team: str, experiment: str) -> list[Budget]:
        return sorted((b for b in self.budgets if b.team == team and b.experiment in ("", experiment)),
                      key=lambda b: b.experiment)

    def expire(self, now: datetime, team: str | None) -> list[str]:
        """An unsettled hold past its expiry is charged in full, to the month it expired in."""
        stale = [a for a in self.with_status(RUNNING)
                 if a.expires_at < now and (team is None or self.run_of(a).team == team)]
        for a in stale:
            a.charges = {month_of(a.expires_at): a.held} if a.held else {}
            a.status, a.cost, a.held = EXPIRED, a.held, 0
        return [a.id for a in stale]

    def reserve(self, key: str, team: str, experiment: str, attempt_id: str, hold: int, cap_arg: int | None,
                now: datetime, hold_for: timedelta) -> tuple[Attempt, int]:
        run = self.runs.get(key)
        prior = self.run_spent(run) + self.run_held(run) if run else 0
        caps = [c for c in (run.cap if run else None, cap_arg) if c is not None]
        cap = min(caps) if caps else None
        refused = False
        if cap is not None:
            refused = prior >= cap
            hold = max(0, min(hold, cap - prior))
        month = month_of(now)
        refused = refused or any(self.used(b, month) + hold > b.amount for b in self.budgets_of(team, experiment))
        if run is None:
            run = self.runs[key] = Run(key, team, experiment, cap)
        run.cap = cap
        held = 0 if refused else hold
        attempt = Attempt(attempt_id, key, len(run.attempts) + 1, REFUSED if refused else RUNNING, held,
                          now + min(hold_for, MAX_HOLD), month, {month: held})
        run.attempts.append(attempt_id)
        self.attempts[attempt_id] = attempt
        return attempt, prior

    def extend(
        self, attempt: Attempt, to: int, hold_for: timedelta | None, now: datetime,
    ) -> tuple[int, int, str | None]:
        if attempt.status != RUNNING:
            return attempt.held, 0, f"attempt is {attempt.status}"
        want = to - attempt.held
        if want <= 0:
            return attempt.held, 0, None
        run = self.run_of(attempt)
        limits = {"request": want}
        if run.cap is not None:
            limits["run cap"] = run.cap - self.run_spent(run) - self.run_held(run)
        month = month_of(now)
        for budget in self.budgets_of(run.team, run.experiment):
            limits[budget.scope] = max(0, budget.amount - self.used(budget, month))
        binding = min(limits, key=limits.get)
        added = max(0, limits[binding])
        if added:
            attempt.held += added
            attempt.hold_by_month[month] = attempt.held
            if hold_for is not None:
                attempt.expires_at = max(attempt.expires_at, now + min(hold_for, MAX_HOLD))
        return attempt.held, added, None if binding == "request" else binding

    def settle(self, attempt: Attempt, charges: dict[str, int], status: str) -> tuple[int, int | None]:
        """Books the charges; returns (over_hold_micros, replaced expiry charge) as the ledger should."""
        replaced = attempt.cost if attempt.status == EXPIRED else None
        limit = attempt.cost if attempt.status == EXPIRED else attempt.held
        total = sum(charges.values())
        over = max(0, total - limit)
        attempt.charges = {m: amount for m, amount in charges.items() if amount}
        attempt.status, attempt.cost, attempt.held = status, total, 0
        self.run_of(attempt).over += over
        return over, replaced


# --- where the ledger lives ------------------------------------------------------------------


@contextmanager
def sqlite_url() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="oppen-ledger-")
    try:
        yield f"sqlite:///{folder}/ledger.db"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def postgres_url():
    return postgres_schema(os.environ[PG_ENV], prefix="oppen_prop")


# --- the state machine -----------------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    """One ledger, two teams, three experiments, and a clock that only moves when a rule moves it."""

    url_factory = staticmethod(sqlite_url)

    def __init__(self) -> None:
        super().__init__()
        self.resources = ExitStack()
        self.ledger = Ledger(self.resources.enter_context(self.url_factory()))
        self.resources.callback(self.ledger.dispose)
        self.ledger.create_schema()
        self.model = Model()
        self.now = START
        self.runs_made = 0

    def teardown(self) -> None:
        self.resources.close()

    @initialize(ml=st.sampled_from(["monthly", "total"]), mnist=st.sampled_from(["monthly", "total"]),
                cv=st.sampled_from(["monthly", "total"]))
    def apply_budgets(self, ml: str, mnist: str, cv: str) -> None:
        apply_budgets(self.ledger, BudgetsFile.model_validate({"teams": {
            "ml": {"budget": {"amount_usd": 1.0, "period": ml},
                   "experiments": {"mnist": {"amount_usd": 0.6, "period": mnist}}},
            "cv": {"budget": {"amount_usd": 0.5, "period": cv}},
        }}))
        self.model.budgets = [Budget("ml", "", 1_000_000, ml), Budget("ml", "mnist", 600_000, mnist),
                              Budget("cv", "", 500_000, cv)]

    # --- the clock ---

    def _wait(self, wait: int | str) -> None:
        """Every action first lets some time pass (WAIT), so holds expire and the month turns."""
        if isinstance(wait, int):
            self.now += timedelta(minutes=wait)
            return
        ahead = [a.expires_at for a in self.model.with_status(RUNNING) if a.expires_at >= self.now]
        if ahead:
            self.now = min(ahead) + (timedelta(microseconds=1) if wait == "past an expiry" else timedelta(0))

    def _note(self, message: str) -> None:
        note(f"{self.now:%Y-%m-%d %H:%M:%S.%f} {message}")  # printed with the steps of a failing example

    @precondition(lambda self: any(a.expires_at < self.now for a in self.model.with_status(RUNNING)))
    @rule()
    def expire_stale(self) -> None:
        expected = self.model.expire(self.now, None)
        self._note(f"expire_stale() -> {expected}")
        assert sorted(self.ledger.expire_stale(now=self.now)) == sorted(expected)

    # --- reservations ---

    @rule(wait=WAIT, where=st.sampled_from(WHERE), hold=HOLDS, hold_for=st.sampled_from(HOLD_FOR), cap=CAPS)
    def reserve_new_run(
        self, wait: int | str, where: tuple[str, str], hold: int, hold_for: timedelta, cap: int | None,
    ) -> None:
        self._wait(wait)
        self.runs_made += 1
        key = f"run-{self.runs_made}"
        self._reserve(key, *where, f"{key}#1", hold, hold_for, cap)

    @precondition(lambda self: self.model.runs)
    @rule(wait=WAIT, pick=PICK, hold=HOLDS, hold_for=st.sampled_from(HOLD_FOR), pass_cap=st.booleans())
    def reschedule_a_run(self, wait: int | str, pick: int, hold: int, hold_for: timedelta, pass_cap: bool) -> None:
        """A new attempt of an existing run; its cap is passed again, or left to the run's record."""
        self._wait(wait)
        run = self._pick(sorted(self.model.runs.values(), key=lambda r: r.key), pick)
        attempt_id = f"{run.key}#{len(run.attempts) + 1}"
        self._reserve(run.key, run.team, run.experiment, attempt_id, hold, hold_for, run.cap if pass_cap else None)

    @precondition(lambda self: self.model.attempts)
    @rule(wait=WAIT, pick=PICK, hold=HOLDS)
    def retry_a_reserve(self, wait: int | str, pick: int, hold: int) -> None:
        """Reserving an attempt id again returns that attempt as it is, whatever is asked."""
        self._wait(wait)
        attempt = self._pick(sorted(self.model.attempts.values(), key=lambda a: a.id), pick)
        run = self.model.run_of(attempt)
        self.model.expire(self.now, run.team)
        self._note(f"reserve({attempt.id}) again, asking {hold}")
        got = self.ledger.reserve(team=run.team, experiment=run.experiment, run_key=run.key, attempt_id=attempt.id,
                                  quote_micros=hold, hold_micros=hold, hold_for=HOLD_FOR[0], cap_micros=run.cap,
                                  now=self.now)
        assert got.reused
        assert (got.status, got.held_micros, got.attempt_number) == (attempt.status, attempt.held, attempt.number)

    def _reserve(self, key: str, team: str, experiment: str, attempt_id: str, hold: int, hold_for: timedelta,
                 cap: int | None) -> None:
        self.model.expire(self.now, team)
        expected, prior = self.model.reserve(key, team, experiment, attempt_id, hold, cap, self.now, hold_for)
        self._note(f"reserve({attempt_id}, {team}/{experiment}, hold={hold}, for={hold_for}, cap={cap}) "
             f"-> {expected.status} {expected.held}")
        got = self.ledger.reserve(team=team, experiment=experiment, run_key=key, attempt_id=attempt_id,
                                  quote_micros=hold, hold_micros=hold, hold_for=hold_for, cap_micros=cap, now=self.now)
        assert (got.status, got.held_micros, got.prior_micros, got.attempt_number) == (
            expected.status, expected.held, prior, expected.number), got.reason
        assert got.reused == (expected.number > 1)

    # --- top-ups ---

    @precondition(lambda self: self.model.with_status(RUNNING))
    @rule(wait=WAIT, pick=PICK, more=TOP_UPS, hold_for=st.sampled_from([None, *HOLD_FOR]))
    def extend(self, wait: int | str, pick: int, more: int, hold_for: timedelta | None) -> None:
        self._wait(wait)
        attempt = self._pick(self.model.with_status(RUNNING), pick)
        to = max(0, attempt.held + more)
        self.model.expire(self.now, self.model.run_of(attempt).team)  # the ledger expires first: it may be gone
        expected = self.model.extend(attempt, to, hold_for, self.now)
        self._note(f"extend({attempt.id}, to={to}, hold_for={hold_for}) -> {expected}")
        grant = self.ledger.extend(attempt.id, to, hold_for=hold_for, now=self.now)
        assert (grant.held_micros, grant.added_micros, grant.limited_by) == expected

    # --- settles ---

    @precondition(lambda self: self.model.with_status(RUNNING))
    @rule(wait=WAIT, pick=PICK, percents=st.lists(st.integers(0, 100), min_size=3, max_size=3),
          status=st.sampled_from(SETTLE_STATUSES))
    def settle_within_the_hold(self, wait: int | str, pick: int, percents: list[int], status: str) -> None:
        """What a meter settles: per month it ran in, never more than it held by the end of that month."""
        self._wait(wait)
        attempt = self._pick(self.model.with_status(RUNNING), pick)
        charges: dict[str, int] = {}
        booked = 0
        for index, month in enumerate(_months(attempt.month, month_of(self.now))):
            room = attempt.may_have_spent_by(month) - booked
            charges[month] = room * percents[index % len(percents)] // 100
            booked += charges[month]
        self._settle(attempt, charges, status)

    @precondition(lambda self: self.model.with_status(RUNNING))
    @rule(wait=WAIT, pick=PICK, extra=st.integers(1, 300_000), status=st.sampled_from(SETTLE_STATUSES))
    def settle_over_the_hold(self, wait: int | str, pick: int, extra: int, status: str) -> None:
        """A cost above the hold (a meter's rounding, a missed stop) is booked and recorded, never hidden."""
        self._wait(wait)
        attempt = self._pick(self.model.with_status(RUNNING), pick)
        self._settle(attempt, {month_of(self.now): attempt.held + extra}, status)

    @precondition(lambda self: self.model.with_status(EXPIRED))
    @rule(wait=WAIT, pick=PICK, percent=st.integers(0, 100), extra=st.just(0) | st.integers(1, 200_000),
          status=st.sampled_from(SETTLE_STATUSES))
    def settle_late(self, wait: int | str, pick: int, percent: int, extra: int, status: str) -> None:
        """A settle after expiry replaces the expiry charge, spread over the months the attempt ran in (never
        more in a month than it held by that month's end), or above its hold (recorded as over_hold)."""
        self._wait(wait)
        attempt = self._pick(self.model.with_status(EXPIRED), pick)
        charges, booked = {}, 0
        total = attempt.cost * percent // 100
        for month in _months(attempt.month, month_of(attempt.expires_at)):
            charges[month] = min(total - booked, attempt.may_have_spent_by(month) - booked)
            booked += charges[month]
        last = month_of(attempt.expires_at)
        charges[last] = charges.get(last, 0) + extra
        self._settle(attempt, {m: v for m, v in charges.items() if v or m == last}, status)

    def _settle(self, attempt: Attempt, charges: dict[str, int], status: str) -> None:
        run = self.model.run_of(attempt)
        over, replaced = self.model.settle(attempt, charges, status)
        self._note(f"settle({attempt.id}, {charges}, {status}) -> over {over}, replaced {replaced}")
        got = self.ledger.settle(attempt.id, charges_by_month=charges, status=status, now=self.now)
        assert not got.replayed
        assert (got.cost_micros, got.run_spent_micros, got.over_hold_micros, got.replaced_expiry_micros) == (
            sum(charges.values()), self.model.run_spent(run), over, replaced)

    @precondition(lambda self: self.model.with_status(*SETTLE_STATUSES))
    @rule(wait=WAIT, pick=PICK, amount=st.integers(0, 2_000_000), status=st.sampled_from(SETTLE_STATUSES))
    def settle_again(self, wait: int | str, pick: int, amount: int, status: str) -> None:
        """A repeated or retried settle, with any amount and status, returns what was booked and changes nothing."""
        self._wait(wait)
        attempt = self._pick(self.model.with_status(*SETTLE_STATUSES), pick)
        before = self._everything()
        self._note(f"settle({attempt.id}, {amount}, {status}) again")
        got = self.ledger.settle(attempt.id, charges_by_month={month_of(self.now): amount}, status=status, now=self.now)
        assert got.replayed and (got.status, got.cost_micros) == (attempt.status, attempt.cost)
        assert got.run_spent_micros == self.model.run_spent(self.model.run_of(attempt))
        assert self._everything() == before

    @precondition(lambda self: self.model.with_status(REFUSED))
    @rule(wait=WAIT, pick=PICK)
    def settle_a_refused_attempt(self, wait: int | str, pick: int) -> None:
        self._wait(wait)
        attempt = self._pick(self.model.with_status(REFUSED), pick)
        before = self._everything()
        with pytest.raises(LedgerError, match="was refused"):
            self.ledger.settle(attempt.id, charges_by_month={month_of(self.now): 1}, now=self.now)
        assert self._everything() == before

    # --- invariants ---

    @invariant()
    def every_attempt_is_booked_once_as_the_model_says(self) -> None:
        rows, booked = self._tables()
        assert set(rows) == set(self.model.attempts)
        for attempt_id, row in rows.items():
            a = self.model.attempts[attempt_id]
            assert (row["status"], row["held_micros"], row["cost_micros"], row["number"], _utc(row["expires_at"])) == (
                a.status, a.held, a.cost, a.number, a.expires_at), attempt_id
            assert row["held_micros"] >= 0
            if a.status != RUNNING:
                assert row["held_micros"] == 0, attempt_id
            mine = {month: amount for (aid, month), amount in booked.items() if aid == attempt_id}
            assert mine == a.charges, attempt_id
            if a.status in (REFUSED, RUNNING):
                assert not mine and row["cost_micros"] is None, attempt_id
            else:  # settled: its real cost; expired: its hold, until a late settle replaces it
                assert sum(mine.values()) == row["cost_micros"], attempt_id
        for team in ("ml", "cv"):
            runs = [run for run in self.model.runs.values() if run.team == team]
            spent = sum(self.model.attempts[a].cost or 0 for run in runs for a in run.attempts)
            assert self.ledger.usage(team) == (spent, sum(self.model.run_held(run) for run in runs))

    @invariant()
    def each_run_sums_its_attempts(self) -> None:
        for row in self.ledger.rows():
            run = self.model.runs[row["run_key"]]
            assert row["spent_micros"] == self.model.run_spent(run), run.key
            assert row["held_micros"] == self.model.run_held(run), run.key
            assert row["attempts"] == len(run.attempts) and row["cap_micros"] == run.cap, run.key
            running = any(self.model.attempts[a].status == RUNNING for a in run.attempts)
            assert (row["status"] == "reserved") == running, (run.key, row["status"])

    @invariant()
    def no_budget_or_cap_is_exceeded(self) -> None:
        """spent + held <= budget in every scope (this month, for a monthly one), and spent + held <= cap
        for every run, give or take what settles above their holds recorded (over_hold_micros)."""
        month = month_of(self.now)
        for budget in self.model.budgets:
            in_scope = self.model.in_scope(budget)
            over = sum(run.over for run in in_scope)
            this_month = month if budget.period == "monthly" else None
            spent, held = self.ledger.usage(budget.team, budget.experiment or None, this_month)
            assert (spent, held) == (self.model.spent(budget, this_month), self.model.held(budget)), budget
            assert spent + held <= budget.amount + over, (budget, this_month)
            if budget.period == "total":
                continue
            # Past months: what was booked to them later (settles of attempts running when they ended)
            # stays within what they held then. Their figures are the model's: the tables equal it.
            for past in sorted({m for run in in_scope for a in run.attempts for m in self.model.attempts[a].charges}):
                assert self.model.spent(budget, past) <= budget.amount + over, (budget, past)
        for run in self.model.runs.values():
            if run.cap is not None:
                assert self.model.run_spent(run) + self.model.run_held(run) <= run.cap + run.over, run.key

    # --- helpers ---

    @staticmethod
    def _pick(candidates: list, pick: int):
        return candidates[pick % len(candidates)]

    def _tables(self) -> tuple[dict[str, dict], dict[tuple[str, str], int]]:
        """Every attempt and charge as stored: (attempts by id, {(attempt, month): amount})."""
        with self.ledger.engine.connect() as c:
            rows = {row.id: dict(row._mapping) for row in c.execute(select(attempts_table))}
            booked = {(row.attempt_id, row.month): int(row.amount_micros) for row in c.execute(select(charges_table))}
        return rows, booked

    def _everything(self) -> tuple:
        return self._tables(), self.ledger.rows()


@settings(max_examples=40, deadline=None, database=None)
@given(holds=st.lists(HOLDS, min_size=1, max_size=3), to=st.sampled_from([0, 1_000_000]) | st.integers(0, 1_500_000),
       cap=CAPS, experiment=st.sampled_from(["mnist", "lm"]))
def test_a_top_up_gets_exactly_what_the_cap_and_every_budget_leave(holds, to, cap, experiment):
    """The first of a few runs of team ml ($1) asks for more; ml/mnist also has its own $0.60."""
    with sqlite_url() as url:
        ledger = Ledger(url)
        ledger.create_schema()
        apply_budgets(ledger, BudgetsFile.model_validate({"teams": {"ml": {
            "budget": {"amount_usd": 1.0, "period": "total"},
            "experiments": {"mnist": {"amount_usd": 0.6, "period": "total"}}}}}))
        held = []
        for index, hold in enumerate(holds):
            reservation = ledger.reserve(
                team="ml", experiment=experiment, run_key=f"r{index}", attempt_id=f"r{index}#1", quote_micros=hold,
                hold_micros=hold, hold_for=HOLD_FOR[0], cap_micros=cap if index == 0 else None, now=START,
            )
            held.append(reservation.held_micros)
        rooms = [to - held[0], 1_000_000 - sum(held)]
        if experiment == "mnist":
            rooms.append(600_000 - sum(held))
        if cap is not None:
            rooms.append(cap - held[0])
        expected = max(0, min(rooms)) if to > held[0] else 0
        grant = ledger.extend("r0#1", to, now=START)
        assert (grant.added_micros, grant.held_micros) == (expected, held[0] + expected)
        assert ledger.used_micros("ml") <= 1_000_000 and ledger.used_micros("ml", "mnist") <= 600_000
        ledger.dispose()


class PostgresLedgerMachine(LedgerMachine):
    url_factory = staticmethod(postgres_url)


def test_ledger_state_machine_sqlite():
    run_state_machine_as_test(LedgerMachine, settings=SQLITE_SETTINGS)


def test_ledger_state_machine_postgresql():
    if not os.environ.get(PG_ENV):
        pytest.skip(f"{PG_ENV} is not set: the PostgreSQL ledger state machine needs a server (.ci/run sets it)")
    run_state_machine_as_test(PostgresLedgerMachine, settings=POSTGRES_SETTINGS)


# --- months and expiries -------------------------------------------------------------------------
#
# An attempt that expires unsettled is charged its whole hold in the month the hold expired in. It
# used to be the month it was reserved in, which, for an attempt that ran past a month's end, let
#   1. a top-up granted against the new month's room be booked to the old month, then over budget;
#   2. another run take the new month's room at the expiry, and the late settle then book on top of it.
# Both are checked here, and by the state machine's late settles across months.

OCT_31 = datetime(2026, 10, 31, 22, tzinfo=timezone.utc)


def _monthly_ledger(tmp_path) -> Ledger:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.create_schema()
    budget = {"amount_usd": 1.0, "period": "monthly"}
    apply_budgets(ledger, BudgetsFile.model_validate({"teams": {"ml": {"budget": budget}}}))
    return ledger


def _hold(ledger: Ledger, key: str, micros: int, hold_for: timedelta, now: datetime):
    return ledger.reserve(team="ml", experiment="x", run_key=key, attempt_id=f"{key}#1", quote_micros=micros,
                          hold_micros=micros, hold_for=hold_for, now=now)


def test_an_expired_hold_topped_up_in_a_later_month_keeps_the_first_month_within_budget(tmp_path):
    ledger = _monthly_ledger(tmp_path)
    _hold(ledger, "x", 500_000, timedelta(hours=1), OCT_31)
    ledger.settle("x#1", charges_by_month={"2026-10": 500_000}, now=OCT_31)  # October: $0.50 spent
    _hold(ledger, "a", 500_000, timedelta(hours=3), OCT_31)  # October: full
    grant = ledger.extend("a#1", 1_000_000, now=OCT_31 + timedelta(hours=2, minutes=30))  # November has room
    assert grant.added_micros == 500_000
    ledger.expire_stale(now=OCT_31 + timedelta(hours=4))
    assert ledger.usage("ml", month="2026-10")[0] <= 1_000_000  # the hold's expiry charge went to November
    ledger.dispose()


def test_a_late_settle_after_an_expiry_keeps_the_month_within_budget(tmp_path):
    ledger = _monthly_ledger(tmp_path)
    _hold(ledger, "a", 500_000, timedelta(hours=3), OCT_31)  # runs into November, then dies unsettled
    refused = _hold(ledger, "b", 1_000_000, timedelta(hours=3), OCT_31 + timedelta(hours=5))
    assert ledger.attempt("a#1")["status"] == "expired"
    assert not refused.accepted  # November keeps the expired hold's room until a settle says otherwise
    later = _hold(ledger, "c", 500_000, timedelta(hours=3), OCT_31 + timedelta(hours=5))
    assert later.accepted
    late = ledger.settle("a#1", charges_by_month={"2026-10": 100_000, "2026-11": 400_000},
                         now=OCT_31 + timedelta(hours=6))  # within its $0.50 hold
    assert late.over_hold_micros == 0 and late.replaced_expiry_micros == 500_000
    spent, held = ledger.usage("ml", month="2026-11")
    assert (spent, held) == (400_000, 500_000) and spent + held <= 1_000_000
    ledger.dispose()
