"""The budget ledger: teams, budgets, and what every attempt of every run held and cost.

SQLite by default (a file next to the other local state), PostgreSQL in production, through the
same SQLAlchemy Core code. Money is integer micro-dollars (oppen.cost.money), so sums are exact.

Every write takes the team's lock first (SELECT ... FOR UPDATE on PostgreSQL; BEGIN IMMEDIATE
on SQLite, which holds the database's write lock), then reads usage and writes in that one
transaction. Hence:
- no interleaving of reservations and top-ups can hold more than a budget has;
- a settle applies at most once per attempt: a repeated or retried settle of the same attempt
  returns what was recorded and changes nothing;
- an attempt that never settled is charged its hold when the hold expires, and a late settle
  replaces that expiry charge with the real cost instead of adding to it;
- a queued run's hold (oppen.cost.queue_holds) counts until its first reservation takes it over,
  in the same transaction, so the run is never counted twice and never charged for waiting.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import and_, case, create_engine, delete, event, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from oppen.cost import queue_holds as queued
from oppen.cost.ledger_schema import attempts, charges, metadata, queue_holds, runs, team_budgets, teams
from oppen.display import percent
from oppen.cost.money import Micros, format_usd, to_micros, to_usd
from oppen.errors import RequestError

Period = Literal["total", "monthly"]
RUNNING = "running"  # an attempt whose hold counts against its budgets
RESERVED = "reserved"  # a run with an attempt running
REFUSED = "refused"
EXPIRED = "expired"
SETTLE_STATUSES = ("settled", "stopped", "failed", "preempted")
MAX_HOLD = timedelta(days=90)  # a hold longer than this is a mistake, and datetime arithmetic must not overflow
_MONTH = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


class LedgerError(ValueError):
    """A request the ledger cannot accept (unknown team, bad amount, unknown attempt)."""


class UnknownTeamError(LedgerError, RequestError):
    """The request names a team the ledger does not know: the user's mistake, not an outage."""


@dataclass(frozen=True)
class BudgetUse:
    """One budget as a reservation or top-up saw it."""

    scope: str  # "team ml" or "experiment ml/mnist"
    period: Period
    amount_micros: Micros
    used_micros: Micros  # spent in scope (this month, if monthly) + every running hold except the request's own
    request_micros: Micros

    @property
    def fraction_after(self) -> float:
        return (self.used_micros + self.request_micros) / self.amount_micros if self.amount_micros else float("inf")

    @property
    def fits(self) -> bool:
        return self.used_micros + self.request_micros <= self.amount_micros

    @property
    def room_micros(self) -> Micros:
        return max(0, self.amount_micros - self.used_micros)

    def describe(self) -> str:
        return (
            f"{self.scope} ({self.period}) budget {format_usd(self.amount_micros)}: {format_usd(self.used_micros)} used, "
            f"{format_usd(self.request_micros)} requested ({percent(self.fraction_after)} used after)"
        )


@dataclass(frozen=True)
class Reservation:
    """One attempt's hold (or its refusal)."""

    run_id: str
    run_key: str
    attempt_id: str
    attempt_number: int
    status: str  # "running" or "refused"
    held_micros: Micros
    prior_micros: Micros  # what the run's other attempts spent or still hold
    cap_micros: Micros | None  # the run's cap over all its attempts
    budgets: tuple[BudgetUse, ...]
    reason: str | None = None
    reused: bool = False  # the run existed before this attempt (rescheduled), or this is a retried reserve

    @property
    def accepted(self) -> bool:
        return self.status == RUNNING

    def warnings(self, fraction: float) -> list[BudgetUse]:
        return [use for use in self.budgets if use.fraction_after >= fraction]


@dataclass(frozen=True)
class Grant:
    """The outcome of a top-up: the attempt's hold now, and what stopped it growing further."""

    held_micros: Micros
    added_micros: Micros
    limited_by: str | None  # None when all that was asked was granted


@dataclass(frozen=True)
class Settlement:
    attempt_id: str
    run_key: str
    status: str
    cost_micros: Micros  # this attempt
    run_spent_micros: Micros  # the run, all attempts
    replayed: bool  # True: this attempt had already settled; nothing changed
    replaced_expiry_micros: Micros | None = None  # the expiry charge this settle replaced
    over_hold_micros: Micros = 0  # > 0 when the attempt cost more than it held (recorded, never hidden)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def month_of(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m")


def make_engine(url: str) -> Engine:
    """An engine whose transactions are safe for the ledger on SQLite as well as PostgreSQL."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record) -> None:
            # Let SQLAlchemy (not pysqlite) issue BEGIN, so it can be BEGIN IMMEDIATE below.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection) -> None:
            # A write takes the write lock at the start, so two reservations cannot both read the old
            # usage; a read begins deferred and, with WAL, neither waits for writers nor blocks them.
            write = connection.get_execution_options().get(WRITE_OPTION, False)
            connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine
    # A ledger that is down must fail fast (the caller journals and retries), not hang a run for minutes.
    connect_args = {"connect_timeout": 5} if url.startswith("postgresql") else {}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


WRITE_OPTION = "oppen_ledger_write"


def _utc(now: datetime | None) -> datetime:
    return (now or utcnow()).astimezone(timezone.utc)  # SQLite keeps naive text: always store UTC


def _scalar_int(c: Connection, query) -> int:
    return int(c.execute(query).scalar_one() or 0)  # PostgreSQL sums BIGINT as NUMERIC


class Ledger:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def create_schema(self) -> None:
        from oppen.cost.ledger_migrate import migrate_v1

        try:
            metadata.create_all(self.engine)
        except (IntegrityError, ProgrammingError, OperationalError):
            # Another process created the tables between our check and create (PostgreSQL races).
            metadata.create_all(self.engine)
        migrate_v1(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction (on SQLite it holds the write lock from its first statement)."""
        with self.engine.connect().execution_options(**{WRITE_OPTION: True}) as conn, conn.begin():
            yield conn

    # --- teams and budgets -------------------------------------------------------------

    def upsert_team(self, name: str, conn: Connection | None = None) -> bool:
        """Create the team if missing; True when it was created."""
        with self._maybe(conn) as c:
            if c.execute(select(teams.c.name).where(teams.c.name == name)).first():
                return False
            c.execute(teams.insert().values(name=name, created_at=utcnow()))
            return True

    def set_budget(
        self, team: str, amount_usd: float | Decimal | str, period: Period, experiment: str = "",
        conn: Connection | None = None,
    ) -> str:
        """Create or change a budget; returns "created", "updated" or "unchanged"."""
        try:
            amount = to_micros(amount_usd, ceiling=True)
        except ValueError as error:
            raise LedgerError(f"budget for {team}/{experiment or '*'}: {error}") from error
        if amount <= 0:
            raise LedgerError(f"budget for {team}/{experiment or '*'} must be at least $0.000001, got {amount_usd}")
        if period not in ("total", "monthly"):
            raise LedgerError(f"budget period must be 'total' or 'monthly', got {period!r}")
        with self._maybe(conn) as c:
            self._require_team(c, team)
            scope = and_(team_budgets.c.team == team, team_budgets.c.experiment == experiment)
            row = c.execute(select(team_budgets).where(scope)).first()
            if row is None:
                c.execute(team_budgets.insert().values(
                    team=team, experiment=experiment, amount_micros=amount, period=period, updated_at=utcnow()))
                return "created"
            if row.amount_micros == amount and row.period == period:
                return "unchanged"
            c.execute(update(team_budgets).where(scope).values(amount_micros=amount, period=period, updated_at=utcnow()))
            return "updated"

    def team_names(self) -> list[str]:
        with self.engine.connect() as c:
            return [row.name for row in c.execute(select(teams.c.name).order_by(teams.c.name))]

    def budgets_of(self, team: str) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(select(team_budgets).where(team_budgets.c.team == team).order_by(team_budgets.c.experiment))
            return [dict(row._mapping) | {"amount_usd": to_usd(row.amount_micros)} for row in rows]

    def budget_uses(self, team: str, experiment: str, request_micros: Micros = 0, now: datetime | None = None) -> list[BudgetUse]:
        """Every budget a run of `experiment` answers to, as it stands now (read-only)."""
        with self.engine.connect() as c:
            self._require_team(c, team)
            return list(self._uses(c, team, experiment, month_of(_utc(now)), request_micros))

    # --- reservations ------------------------------------------------------------------

    def reserve(
        self,
        *,
        team: str,
        experiment: str,
        run_key: str,
        attempt_id: str,
        quote_micros: Micros,
        hold_micros: Micros,
        hold_for: timedelta,
        cap_micros: Micros | None = None,
        min_hold_micros: Micros = 0,
        workload: str = "",
        mlflow_run_id: str | None = None,
        now: datetime | None = None,
    ) -> Reservation:
        """Hold `hold_micros` for this attempt against every budget of the team and experiment, or refuse.

        The hold is at least `min_hold_micros` (what the attempt needs to end well) and never exceeds what
        the run's cap has left after its other attempts; when that is less than `min_hold_micros`, the
        attempt is refused. A refusal
        is recorded too (an attempt with status "refused", nothing held). Reserving an attempt id that
        already exists returns that attempt unchanged (a retried reserve).
        """
        self._check_amounts(quote_micros=quote_micros, hold_micros=hold_micros, cap_micros=cap_micros,
                            min_hold_micros=min_hold_micros)
        now = _utc(now)
        with self.transaction() as c:
            self._lock_team(c, team)
            self._expire_stale(c, now, team)
            run = c.execute(select(runs).where(runs.c.run_key == run_key)).first()
            if run is not None:
                self._check_same_scope(run, team, experiment)
                again = c.execute(select(attempts).where(attempts.c.id == attempt_id)).first()
                if again is not None:
                    return self._reservation_of(c, run, again)
            queued.adopt(c, run_key, now)  # its queue hold ends here, before the budgets are read
            prior = self._run_spent(c, run.id) + self._run_held(c, run.id) if run is not None else 0
            cap = _tighter(run.cap_micros if run is not None else None, cap_micros)
            # At least what the attempt needs to end well (a quote's p90 can be below what loading already took
            # on a busy machine), never more than the run's cap has left.
            hold, reason = max(hold_micros, min_hold_micros), None
            if cap is not None:
                hold = max(0, min(hold, cap - prior))
                if prior >= cap:
                    reason = f"run cap {format_usd(cap)} already spent by its earlier attempts ({format_usd(prior)})"
                elif cap - prior < min_hold_micros:
                    reason = (f"run cap {format_usd(cap)} has {format_usd(cap - prior)} left after its earlier attempts "
                              f"({format_usd(prior)}), less than this attempt needs to end well "
                              f"({format_usd(min_hold_micros)}: what it spent loading, its test pass and model logging)")
            uses = tuple(self._uses(c, team, experiment, month_of(now), hold))
            over = [use for use in uses if not use.fits]
            if reason is None and over:
                reason = "; ".join(f"over budget: {use.describe()}" for use in over)
            status = REFUSED if reason else RUNNING
            held = 0 if reason else hold
            if run is None:
                run_id = str(uuid.uuid4())
                c.execute(runs.insert().values(
                    id=run_id, run_key=run_key, team=team, experiment=experiment, workload=workload,
                    month=month_of(now), cap_micros=cap, quote_micros=quote_micros, spent_micros=0,
                    status=REFUSED if reason else RESERVED, reason=reason, mlflow_run_id=mlflow_run_id,
                    created_at=now, detail=json.dumps({"budgets": [use.describe() for use in uses]}),
                ))
            else:
                run_id = run.id
                still_running = self._run_held_count(c, run_id) > 0
                c.execute(update(runs).where(runs.c.id == run_id).values(
                    status=RESERVED if (not reason or still_running) else REFUSED, reason=reason, quote_micros=quote_micros,
                    cap_micros=cap, mlflow_run_id=mlflow_run_id or run.mlflow_run_id,
                ))
            number = _scalar_int(c, select(func.coalesce(func.max(attempts.c.number), 0)).where(attempts.c.run_id == run_id)) + 1
            c.execute(attempts.insert().values(
                id=attempt_id, run_id=run_id, number=number, status=status, held_micros=held, cost_micros=None,
                month=month_of(now), started_at=now, expires_at=now + min(hold_for, MAX_HOLD),
                settled_at=now if reason else None, reason=reason,
            ))
            return Reservation(run_id, run_key, attempt_id, number, status, held, prior, cap, uses, reason,
                               reused=run is not None)

    def refuse(
        self, *, team: str, experiment: str, run_key: str, attempt_id: str, reason: str, workload: str = "",
        quote_micros: Micros = 0, cap_micros: Micros | None = None, now: datetime | None = None,
    ) -> Reservation:
        """Record a refusal decided before any hold was asked for (an exhausted budget, a quote that cannot fit)."""
        now = _utc(now)
        with self.transaction() as c:
            self._lock_team(c, team)
            queued.adopt(c, run_key, now, f"the run started and was refused: {reason}")  # it holds nothing now
            run = c.execute(select(runs).where(runs.c.run_key == run_key)).first()
            if run is None:
                run_id = str(uuid.uuid4())
                c.execute(runs.insert().values(
                    id=run_id, run_key=run_key, team=team, experiment=experiment, workload=workload, month=month_of(now),
                    cap_micros=cap_micros, quote_micros=quote_micros, spent_micros=0, status=REFUSED, reason=reason,
                    created_at=now,
                ))
            else:
                self._check_same_scope(run, team, experiment)
                run_id = run.id
                again = c.execute(select(attempts).where(attempts.c.id == attempt_id)).first()
                if again is not None:
                    return self._reservation_of(c, run, again)
                c.execute(update(runs).where(runs.c.id == run_id).values(status=REFUSED, reason=reason))
            number = _scalar_int(c, select(func.coalesce(func.max(attempts.c.number), 0)).where(attempts.c.run_id == run_id)) + 1
            c.execute(attempts.insert().values(
                id=attempt_id, run_id=run_id, number=number, status=REFUSED, held_micros=0, month=month_of(now),
                started_at=now, expires_at=now, settled_at=now, reason=reason,
            ))
            return Reservation(run_id, run_key, attempt_id, number, REFUSED, 0, 0, cap_micros, (), reason)

    def extend(
        self, attempt_id: str, to_micros: Micros, *, hold_for: timedelta | None = None, now: datetime | None = None,
    ) -> Grant:
        """Top a running attempt's hold up towards `to_micros`, as far as its run's cap and every budget allow."""
        now = _utc(now)
        with self.transaction() as c:
            team, run_id = self._owner_of(c, attempt_id)
            self._lock_team(c, team)
            self._expire_stale(c, now, team)
            attempt = c.execute(select(attempts).where(attempts.c.id == attempt_id)).first()
            if attempt.status != RUNNING:
                return Grant(attempt.held_micros, 0, f"attempt is {attempt.status}")
            want = to_micros - attempt.held_micros
            if want <= 0:
                return Grant(attempt.held_micros, 0, None)
            run = c.execute(select(runs).where(runs.c.id == run_id)).first()
            limits = {"request": want}
            if run.cap_micros is not None:
                others = self._run_spent(c, run_id) + self._run_held(c, run_id) - attempt.held_micros
                limits["run cap"] = run.cap_micros - others - attempt.held_micros
            for use in self._uses(c, team, run.experiment, month_of(now), 0):
                limits[use.scope] = use.room_micros  # its used_micros already counts this attempt's hold
            binding = min(limits, key=limits.get)
            added = max(0, limits[binding])
            if added:
                values: dict[str, Any] = {"held_micros": attempt.held_micros + added}
                if hold_for is not None:
                    values["expires_at"] = max(_as_utc(attempt.expires_at), now + min(hold_for, MAX_HOLD))
                c.execute(update(attempts).where(attempts.c.id == attempt_id).values(**values))
            return Grant(attempt.held_micros + added, added, None if binding == "request" else binding)

    def settle(
        self,
        attempt_id: str,
        *,
        charges_by_month: Mapping[str, Micros],
        status: str = "settled",
        reason: str | None = None,
        mlflow_run_id: str | None = None,
        detail: dict | None = None,
        now: datetime | None = None,
    ) -> Settlement:
        """Book what this attempt cost, per month, and release its hold. At most once per attempt."""
        if status not in SETTLE_STATUSES:
            raise LedgerError(f"settle status must be one of {SETTLE_STATUSES}, got {status!r}")
        for month, amount in charges_by_month.items():
            if not _MONTH.match(month) or not isinstance(amount, int) or amount < 0:
                raise LedgerError(f"a charge is a YYYY-MM month and whole micro-dollars >= 0, got {month!r}: {amount!r}")
        now = _utc(now)
        total = sum(charges_by_month.values())
        with self.transaction() as c:
            team, run_id = self._owner_of(c, attempt_id)
            self._lock_team(c, team)
            attempt = c.execute(select(attempts).where(attempts.c.id == attempt_id)).first()
            run = c.execute(select(runs).where(runs.c.id == run_id)).first()
            if attempt.status in SETTLE_STATUSES:
                return Settlement(attempt_id, run.run_key, attempt.status, attempt.cost_micros or 0,
                                  self._run_spent(c, run_id), replayed=True)
            if attempt.status == REFUSED:
                raise LedgerError(f"attempt {attempt_id} was refused before it ran; there is nothing to settle")
            replaced = None
            limit = attempt.held_micros
            if attempt.status == EXPIRED:
                replaced, limit = attempt.cost_micros, attempt.cost_micros or 0
                c.execute(delete(charges).where(charges.c.attempt_id == attempt_id))
            for month, amount in sorted(charges_by_month.items()):
                if amount:
                    c.execute(insert(charges).values(attempt_id=attempt_id, month=month, amount_micros=amount,
                                                     kind="usage", booked_at=now))
            over = max(0, total - limit)
            record = dict(detail or {}) | ({"over_hold_micros": over} if over else {})
            c.execute(update(attempts).where(attempts.c.id == attempt_id).values(
                status=status, cost_micros=total, held_micros=0, settled_at=now, reason=reason,
                detail=json.dumps(record, sort_keys=True) if record else None,
            ))
            spent = self._run_spent(c, run_id)
            running_left = self._run_held_count(c, run_id)
            values: dict[str, Any] = {"spent_micros": spent, "status": RESERVED if running_left else status,
                                      "reason": reason, "settled_at": now}
            if mlflow_run_id:
                values["mlflow_run_id"] = mlflow_run_id
            if detail is not None:
                values["detail"] = json.dumps(detail, sort_keys=True)
            c.execute(update(runs).where(runs.c.id == run_id).values(**values))
            return Settlement(attempt_id, run.run_key, status, total, spent, replayed=False,
                              replaced_expiry_micros=replaced, over_hold_micros=over)

    # --- queued runs ---------------------------------------------------------------------

    def hold_queued(
        self, *, team: str, experiment: str, run_key: str, hold_micros: Micros, hold_for: timedelta,
        quote_micros: Micros | None = None, expected_seconds: float | None = None, workload: str = "", queue: str = "",
        now: datetime | None = None,
    ) -> queued.QueueHold:
        """Hold `hold_micros` for a run that waits in a queue, or refuse it (recorded with the reason).

        Holding the same run again returns the first answer. A run that already reserved for itself
        (it started before it was held) is recorded as started, holding nothing: it is never counted twice.
        """
        self._check_amounts(hold_micros=hold_micros, quote_micros=quote_micros)
        now = _utc(now)
        with self.transaction() as c:
            self._lock_team(c, team)
            self._expire_stale(c, now, team)
            existing = c.execute(select(queue_holds).where(queue_holds.c.run_key == run_key)).first()
            if existing is not None:
                return queued.as_hold(existing)
            started = c.execute(select(runs.c.id).where(runs.c.run_key == run_key)).first() is not None
            uses = [] if started else list(self._uses(c, team, experiment, month_of(now), hold_micros))
            reason = "; ".join(f"over budget: {use.describe()}" for use in uses if not use.fits) or None
            status = queued.STARTED if started else REFUSED if reason else queued.HELD
            c.execute(insert(queue_holds).values(
                run_key=run_key, team=team, experiment=experiment, workload=workload, queue=queue,
                held_micros=hold_micros if status == queued.HELD else 0, quote_micros=quote_micros,
                expected_seconds=round(expected_seconds) if expected_seconds is not None else None,
                status=status, reason=reason or ("the run reserved for itself first" if started else None),
                created_at=now, expires_at=now + min(hold_for, MAX_HOLD), closed_at=None if status == queued.HELD else now,
            ))
            return queued.as_hold(c.execute(select(queue_holds).where(queue_holds.c.run_key == run_key)).one())

    def release_queued(self, run_key: str, reason: str, now: datetime | None = None) -> queued.QueueHold | None:
        """Cancel a queued run's hold (what it held stops counting); None when it has none. Idempotent."""
        now = _utc(now)
        row = self.queue_hold(run_key)
        if row is None:
            return None
        with self.transaction() as c:
            self._lock_team(c, row.team)
            c.execute(update(queue_holds).where(queue_holds.c.run_key == run_key, queue_holds.c.status == queued.HELD)
                      .values(status=queued.CANCELLED, held_micros=0, closed_at=now, reason=reason))
            return queued.as_hold(c.execute(select(queue_holds).where(queue_holds.c.run_key == run_key)).one())

    def queue_hold(self, run_key: str) -> queued.QueueHold | None:
        with self.engine.connect() as c:
            row = c.execute(select(queue_holds).where(queue_holds.c.run_key == run_key)).first()
            return queued.as_hold(row) if row is not None else None

    def queue_holds(self, *, status: str | None = queued.HELD, team: str | None = None,
                    run_keys: list[str] | None = None) -> list[queued.QueueHold]:
        query = select(queue_holds).order_by(queue_holds.c.created_at)
        if run_keys is not None:
            query = query.where(queue_holds.c.run_key.in_(run_keys))
        if status:
            query = query.where(queue_holds.c.status == status)
        if team:
            query = query.where(queue_holds.c.team == team)
        with self.engine.connect() as c:
            return [queued.as_hold(row) for row in c.execute(query)]

    def expire_stale(self, now: datetime | None = None) -> list[str]:
        """Charge every hold past its expiry (all teams); returns the attempts that expired."""
        with self.transaction() as c:
            return self._expire_stale(c, _utc(now), None)

    # --- reading ------------------------------------------------------------------------

    def attempt(self, attempt_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(select(attempts).where(attempts.c.id == attempt_id)).first()
            return dict(row._mapping) if row else None

    def attempts_of(self, run_key: str) -> list[dict]:
        with self.engine.connect() as c:
            query = (select(attempts).join(runs, attempts.c.run_id == runs.c.id)
                     .where(runs.c.run_key == run_key).order_by(attempts.c.number))
            return [dict(row._mapping) for row in c.execute(query)]

    def charges_of(self, run_key: str) -> list[dict]:
        with self.engine.connect() as c:
            query = (select(charges).join(attempts, charges.c.attempt_id == attempts.c.id)
                     .join(runs, attempts.c.run_id == runs.c.id).where(runs.c.run_key == run_key)
                     .order_by(attempts.c.number, charges.c.month))
            return [dict(row._mapping) for row in c.execute(query)]

    def rows(
        self, *, team: str | None = None, experiment: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> list[dict]:
        """One dict per run: its figures in micro-dollars and as exact dollars (`*_usd`, Decimal)."""
        per_attempt = (
            select(
                attempts.c.run_id,
                func.count().label("attempts"),
                func.coalesce(func.sum(case((attempts.c.status == RUNNING, attempts.c.held_micros), else_=0)), 0)
                .label("held_micros"),
            ).group_by(attempts.c.run_id).subquery()
        )
        query = (select(runs, per_attempt.c.attempts, per_attempt.c.held_micros)
                 .outerjoin(per_attempt, per_attempt.c.run_id == runs.c.id).order_by(runs.c.created_at))
        if team:
            query = query.where(runs.c.team == team)
        if experiment:
            query = query.where(runs.c.experiment == experiment)
        if since:
            query = query.where(runs.c.created_at >= since)
        if until:
            query = query.where(runs.c.created_at < until)
        with self.engine.connect() as c:
            return [_run_row(dict(row._mapping)) for row in c.execute(query)]

    def usage(self, team: str, experiment: str | None = None, month: str | None = None) -> tuple[Micros, Micros]:
        """(spent, held): charges in scope (and month), and the holds of attempts still running."""
        with self.engine.connect() as c:
            return self._spent(c, team, experiment, month), self._held(c, team, experiment)

    def used_micros(self, team: str, experiment: str | None = None, month: str | None = None) -> Micros:
        return sum(self.usage(team, experiment, month))

    # --- internals ---------------------------------------------------------------------

    @contextmanager
    def _maybe(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self.transaction() as c:
                yield c

    @staticmethod
    def _check_amounts(**amounts: Micros | None) -> None:
        for name, value in amounts.items():
            if value is not None and (not isinstance(value, int) or value < 0):
                raise LedgerError(f"{name} must be whole micro-dollars >= 0, got {value!r}")

    @staticmethod
    def _check_same_scope(run, team: str, experiment: str) -> None:
        if (run.team, run.experiment) != (team, experiment):
            raise LedgerError(
                f"run {run.run_key} is booked to {run.team}/{run.experiment}; a later attempt cannot move it to "
                f"{team}/{experiment}"
            )

    def _require_team(self, c: Connection, team: str) -> None:
        if c.execute(select(teams.c.name).where(teams.c.name == team)).first() is None:
            known = ", ".join(r.name for r in c.execute(select(teams.c.name).order_by(teams.c.name))) or "none"
            raise UnknownTeamError(f"unknown team {team!r} (known: {known}); add it to the budgets file and apply it")

    def _lock_team(self, c: Connection, team: str) -> None:
        # FOR UPDATE serialises every write of one team on PostgreSQL; SQLite's BEGIN IMMEDIATE
        # already holds the whole database's write lock (and ignores FOR UPDATE).
        row = c.execute(select(teams.c.name).where(teams.c.name == team).with_for_update()).first()
        if row is None:
            self._require_team(c, team)

    @staticmethod
    def _owner_of(c: Connection, attempt_id: str) -> tuple[str, str]:
        row = c.execute(select(runs.c.team, runs.c.id).join(attempts, attempts.c.run_id == runs.c.id)
                        .where(attempts.c.id == attempt_id)).first()
        if row is None:
            raise LedgerError(f"no attempt {attempt_id} in the ledger")
        return row.team, row.id

    def _uses(self, c: Connection, team: str, experiment: str, month: str, request: Micros) -> Iterator[BudgetUse]:
        scoped = or_(team_budgets.c.experiment == "", team_budgets.c.experiment == experiment)
        for row in c.execute(select(team_budgets).where(team_budgets.c.team == team, scoped)
                             .order_by(team_budgets.c.experiment)):
            scope_experiment = row.experiment or None
            in_month = month if row.period == "monthly" else None
            yield BudgetUse(
                scope=f"experiment {team}/{row.experiment}" if row.experiment else f"team {team}",
                period=row.period,
                amount_micros=int(row.amount_micros),
                used_micros=self._spent(c, team, scope_experiment, in_month) + self._held(c, team, scope_experiment),
                request_micros=request,
            )

    @staticmethod
    def _spent(c: Connection, team: str, experiment: str | None, month: str | None) -> Micros:
        query = (select(func.coalesce(func.sum(charges.c.amount_micros), 0))
                 .select_from(charges.join(attempts, charges.c.attempt_id == attempts.c.id)
                              .join(runs, attempts.c.run_id == runs.c.id))
                 .where(runs.c.team == team))
        if experiment:
            query = query.where(runs.c.experiment == experiment)
        if month:
            query = query.where(charges.c.month == month)
        return _scalar_int(c, query)

    @staticmethod
    def _held(c: Connection, team: str, experiment: str | None) -> Micros:
        # Holds count in every month's budget: a running attempt may still spend in this one.
        query = (select(func.coalesce(func.sum(attempts.c.held_micros), 0))
                 .select_from(attempts.join(runs, attempts.c.run_id == runs.c.id))
                 .where(runs.c.team == team, attempts.c.status == RUNNING))
        if experiment:
            query = query.where(runs.c.experiment == experiment)
        return _scalar_int(c, query) + queued.held_micros(c, team, experiment)

    @staticmethod
    def _run_spent(c: Connection, run_id: str) -> Micros:
        return _scalar_int(c, select(func.coalesce(func.sum(charges.c.amount_micros), 0))
                           .select_from(charges.join(attempts, charges.c.attempt_id == attempts.c.id))
                           .where(attempts.c.run_id == run_id))

    @staticmethod
    def _run_held(c: Connection, run_id: str) -> Micros:
        return _scalar_int(c, select(func.coalesce(func.sum(attempts.c.held_micros), 0))
                           .where(attempts.c.run_id == run_id, attempts.c.status == RUNNING))

    @staticmethod
    def _run_held_count(c: Connection, run_id: str) -> int:
        return _scalar_int(c, select(func.count()).select_from(attempts)
                           .where(attempts.c.run_id == run_id, attempts.c.status == RUNNING))

    def _reservation_of(self, c: Connection, run, attempt) -> Reservation:
        prior = self._run_spent(c, run.id) + self._run_held(c, run.id) - (attempt.held_micros if attempt.status == RUNNING else 0)
        uses = tuple(self._uses(c, run.team, run.experiment, attempt.month, 0)) if attempt.status == RUNNING else ()
        return Reservation(run.id, run.run_key, attempt.id, attempt.number, attempt.status, attempt.held_micros, prior,
                           run.cap_micros, uses, attempt.reason, reused=True)

    def _expire_stale(self, c: Connection, now: datetime, team: str | None) -> list[str]:
        # An attempt that died without settling (SIGKILL, node loss, a ledger outage it never
        # recovered from) must not hold budget forever: past its expiry it is charged its hold, the
        # conservative assumption, until a late settle replaces that charge with the real cost.
        query = (select(attempts.c.id, attempts.c.run_id, attempts.c.held_micros, attempts.c.expires_at)
                 .join(runs, attempts.c.run_id == runs.c.id)
                 .where(attempts.c.status == RUNNING, attempts.c.expires_at < now))
        if team:
            query = query.where(runs.c.team == team)
        stale = c.execute(query).all()
        queued.lapse_stale(c, now, team)
        reason = "held past its expiry without settling; charged its hold until a settle says otherwise"
        for row in stale:
            # Booked to the month the hold expired in: a running hold counts against every month's budget,
            # so that month kept room for all of it, top-ups included, and a late settle that moves part of
            # it to earlier months moves it into room those months also kept while the attempt ran.
            if row.held_micros:
                c.execute(insert(charges).values(attempt_id=row.id, month=month_of(_as_utc(row.expires_at)),
                                                 amount_micros=row.held_micros, kind="expiry", booked_at=now))
            c.execute(update(attempts).where(attempts.c.id == row.id).values(
                status=EXPIRED, cost_micros=row.held_micros, held_micros=0, settled_at=now, reason=reason))
        for run_id in {row.run_id for row in stale}:
            values: dict[str, Any] = {"spent_micros": self._run_spent(c, run_id)}
            if not self._run_held_count(c, run_id):
                values |= {"status": EXPIRED, "reason": reason, "settled_at": now}
            c.execute(update(runs).where(runs.c.id == run_id).values(**values))
        return [row.id for row in stale]


def _tighter(a: Micros | None, b: Micros | None) -> Micros | None:
    present = [value for value in (a, b) if value is not None]
    return min(present) if present else None


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _run_row(row: dict) -> dict:
    row["attempts"] = int(row.get("attempts") or 0)
    row["held_micros"] = int(row.get("held_micros") or 0)
    row["spent_micros"] = int(row["spent_micros"] or 0)
    row["quote_usd"] = to_usd(row["quote_micros"])
    row["reserved_usd"] = to_usd(row["held_micros"])
    row["actual_usd"] = to_usd(row["spent_micros"])
    row["cap_usd"] = to_usd(row["cap_micros"]) if row["cap_micros"] is not None else None
    return row
