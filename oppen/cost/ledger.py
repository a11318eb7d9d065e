"""The budget ledger: teams, budgets and one row per run's reservation, in SQL.

SQLite by default (a file next to the other local state), PostgreSQL in production, through the
same SQLAlchemy Core code. A reservation is atomic: the team's row is locked (SELECT ... FOR
UPDATE on PostgreSQL, BEGIN IMMEDIATE on SQLite, which takes the database write lock), usage is
summed and the new row inserted in that one transaction, so concurrent runs can never jointly
overspend a budget.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    event,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

Period = Literal["total", "monthly"]
# Statuses whose cost counts against a budget: reserved (held, not yet known) or actually spent.
HELD = "reserved"
SPENT = ("settled", "stopped", "failed", "preempted", "expired")  # preempted: rescheduled, reopened by its next attempt
REFUSED = "refused"

metadata = MetaData()

teams = Table(
    "oppen_teams",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

budgets = Table(
    "oppen_budgets",
    metadata,
    Column("team", String(63), ForeignKey("oppen_teams.name"), nullable=False),
    Column("experiment", String(255), nullable=False, default=""),  # "" is the team-wide budget
    Column("amount_usd", Float, nullable=False),
    Column("period", String(16), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("team", "experiment", name="oppen_budgets_scope"),
)

reservations = Table(
    "oppen_reservations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_key", String(255), nullable=False, unique=True),  # the flow run id: a rescheduled run finds its row
    Column("team", String(63), ForeignKey("oppen_teams.name"), nullable=False, index=True),
    Column("experiment", String(255), nullable=False, index=True),
    Column("workload", String(63), nullable=False, default=""),
    Column("month", String(7), nullable=False, index=True),  # YYYY-MM (UTC) the run is charged to
    Column("quote_usd", Float, nullable=False),
    Column("reserved_usd", Float, nullable=False),
    Column("actual_usd", Float, nullable=True),
    Column("status", String(16), nullable=False, index=True),
    Column("reason", Text, nullable=True),
    Column("mlflow_run_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True), nullable=True),
    Column("detail", Text, nullable=True),  # JSON: gpu/cpu hours, metric, per-budget usage at reserve time
)


class LedgerError(ValueError):
    """A request the ledger cannot accept (unknown team, bad budget)."""


class UnknownTeamError(LedgerError):
    pass


@dataclass(frozen=True)
class BudgetUse:
    """One budget as the reservation saw it."""

    scope: str  # "team ml" or "experiment ml/mnist"
    period: Period
    amount_usd: float
    used_usd: float  # spent + held by other runs, before this reservation
    request_usd: float

    @property
    def fraction_after(self) -> float:
        return (self.used_usd + self.request_usd) / self.amount_usd if self.amount_usd else float("inf")

    @property
    def fits(self) -> bool:
        # A hair of tolerance so a request of exactly the remainder is accepted despite float sums.
        return self.used_usd + self.request_usd <= self.amount_usd * (1 + 1e-9)

    def describe(self) -> str:
        return (
            f"{self.scope} ({self.period}) budget ${self.amount_usd:,.4f}: ${self.used_usd:,.4f} used, "
            f"${self.request_usd:,.4f} requested ({self.fraction_after:.0%} after)"
        )


@dataclass(frozen=True)
class Reservation:
    id: str
    run_key: str
    status: str  # "reserved" or "refused" (or a final status when an existing row is returned)
    reserved_usd: float
    budgets: tuple[BudgetUse, ...]
    reason: str | None = None
    reused: bool = False  # True when the run already held a reservation (a rescheduled run)

    @property
    def accepted(self) -> bool:
        return self.status == HELD

    @property
    def headroom_usd(self) -> float | None:
        """What the tightest budget had left before this run (None when no budget was consulted)."""
        return min((use.amount_usd - use.used_usd for use in self.budgets), default=None)

    def warnings(self, fraction: float) -> list[BudgetUse]:
        return [use for use in self.budgets if use.fraction_after >= fraction]


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
            # Take the write lock at the start: two reservations cannot both read the old usage.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


class Ledger:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)

    def create_schema(self) -> None:
        try:
            metadata.create_all(self.engine)
        except (IntegrityError, ProgrammingError, OperationalError):
            # Another process created the tables between our check and create (PostgreSQL races).
            metadata.create_all(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
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
        self, team: str, amount_usd: float, period: Period, experiment: str = "", conn: Connection | None = None
    ) -> str:
        """Create or change a budget; returns "created", "updated" or "unchanged"."""
        if not (amount_usd > 0):
            raise LedgerError(f"budget for {team}/{experiment or '*'} must be positive, got {amount_usd}")
        if period not in ("total", "monthly"):
            raise LedgerError(f"budget period must be 'total' or 'monthly', got {period!r}")
        with self._maybe(conn) as c:
            self._require_team(c, team)
            scope = and_(budgets.c.team == team, budgets.c.experiment == experiment)
            row = c.execute(select(budgets).where(scope)).first()
            if row is None:
                c.execute(budgets.insert().values(
                    team=team, experiment=experiment, amount_usd=amount_usd, period=period, updated_at=utcnow()))
                return "created"
            if row.amount_usd == amount_usd and row.period == period:
                return "unchanged"
            c.execute(update(budgets).where(scope).values(amount_usd=amount_usd, period=period, updated_at=utcnow()))
            return "updated"

    def team_names(self) -> list[str]:
        with self.engine.connect() as c:
            return [row.name for row in c.execute(select(teams.c.name).order_by(teams.c.name))]

    def budgets_of(self, team: str) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(select(budgets).where(budgets.c.team == team).order_by(budgets.c.experiment))
            return [dict(row._mapping) for row in rows]

    # --- reservations ------------------------------------------------------------------

    def reserve(
        self,
        *,
        team: str,
        experiment: str,
        run_key: str,
        quote_usd: float,
        reserve_usd: float,
        hold_for: timedelta,
        workload: str = "",
        mlflow_run_id: str | None = None,
        now: datetime | None = None,
    ) -> Reservation:
        """Hold `reserve_usd` against every budget of the team and experiment, or refuse.

        A refusal is recorded too (status "refused", nothing held), so the audit trail shows it.
        A run that already holds a reservation (rescheduled after preemption) gets it back.
        """
        if not (reserve_usd >= 0) or reserve_usd == float("inf"):
            raise LedgerError(f"cannot reserve {reserve_usd!r} USD")
        now = (now or utcnow()).astimezone(timezone.utc)  # SQLite keeps naive text: always store UTC
        month = month_of(now)
        with self._tx() as c:
            self._lock_team(c, team)
            existing = c.execute(select(reservations).where(reservations.c.run_key == run_key)).first()
            if existing is not None and existing.status == HELD:
                return Reservation(existing.id, run_key, HELD, existing.reserved_usd, (), existing.reason, reused=True)
            if existing is not None and existing.status == REFUSED:
                c.execute(reservations.delete().where(reservations.c.id == existing.id))  # a retry: decide afresh
                existing = None
            self._expire_stale(c, team, now)
            uses = tuple(
                BudgetUse(
                    scope=f"experiment {team}/{row.experiment}" if row.experiment else f"team {team}",
                    period=row.period,
                    amount_usd=row.amount_usd,
                    used_usd=self._used(c, team, row.experiment or None, month if row.period == "monthly" else None),
                    request_usd=reserve_usd,
                )
                for row in c.execute(
                    select(budgets).where(budgets.c.team == team, or_(budgets.c.experiment == "",
                                                                      budgets.c.experiment == experiment))
                )
            )
            over = [use for use in uses if not use.fits]
            status = REFUSED if over else HELD
            reason = "; ".join(f"over budget: {use.describe()}" for use in over) or None
            held = 0.0 if over else reserve_usd
            if existing is not None:
                # A rescheduled attempt of a run whose earlier attempt settled (preempted, crashed):
                # what it already spent stays in actual_usd, and settle adds this attempt's cost.
                if over:
                    return Reservation(existing.id, run_key, REFUSED, 0.0, uses, reason, reused=True)
                c.execute(update(reservations).where(reservations.c.id == existing.id).values(
                    status=HELD, reserved_usd=held, quote_usd=quote_usd, expires_at=now + hold_for, settled_at=None))
                return Reservation(existing.id, run_key, HELD, held, uses, None, reused=True)
            reservation_id = str(uuid.uuid4())
            c.execute(reservations.insert().values(
                id=reservation_id, run_key=run_key, team=team, experiment=experiment, workload=workload,
                month=month, quote_usd=quote_usd, reserved_usd=held, status=status,
                reason=reason, mlflow_run_id=mlflow_run_id, created_at=now, expires_at=now + hold_for,
                detail=json.dumps({"budgets": [use.describe() for use in uses]}),
            ))
            return Reservation(reservation_id, run_key, status, held, uses, reason)

    def settle(
        self, reservation_id: str, *, actual_usd: float, status: str = "settled", reason: str | None = None,
        mlflow_run_id: str | None = None, detail: dict | None = None, now: datetime | None = None,
    ) -> None:
        """Record what this attempt really cost and release what was held (also for failed or stopped runs).

        The cost is added to what earlier attempts of the same run already spent (0 for most runs).
        """
        if status not in SPENT:
            raise LedgerError(f"settle status must be one of {SPENT}, got {status!r}")
        if not (actual_usd >= 0):
            raise LedgerError(f"actual cost must be >= 0, got {actual_usd!r}")
        settled_at = (now or utcnow()).astimezone(timezone.utc)
        values = {"actual_usd": func.coalesce(reservations.c.actual_usd, 0.0) + actual_usd, "reserved_usd": 0.0, "status": status, "settled_at": settled_at,
                  "reason": reason}
        if mlflow_run_id:
            values["mlflow_run_id"] = mlflow_run_id
        if detail is not None:
            values["detail"] = json.dumps(detail, sort_keys=True)
        with self._tx() as c:
            done = c.execute(update(reservations).where(reservations.c.id == reservation_id).values(**values))
            if done.rowcount != 1:
                raise LedgerError(f"no reservation {reservation_id}")

    def get(self, reservation_id: str) -> dict | None:
        with self.engine.connect() as c:
            row = c.execute(select(reservations).where(reservations.c.id == reservation_id)).first()
            return dict(row._mapping) if row else None

    def rows(
        self, *, team: str | None = None, experiment: str | None = None,
        since: datetime | None = None, until: datetime | None = None,
    ) -> list[dict]:
        query = select(reservations).order_by(reservations.c.created_at)
        if team:
            query = query.where(reservations.c.team == team)
        if experiment:
            query = query.where(reservations.c.experiment == experiment)
        if since:
            query = query.where(reservations.c.created_at >= since)
        if until:
            query = query.where(reservations.c.created_at < until)
        with self.engine.connect() as c:
            return [dict(row._mapping) for row in c.execute(query)]

    def used_usd(self, team: str, experiment: str | None = None, month: str | None = None) -> float:
        with self.engine.connect() as c:
            return self._used(c, team, experiment, month)

    # --- internals ---------------------------------------------------------------------

    @contextmanager
    def _maybe(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self._tx() as c:
                yield c

    def _require_team(self, c: Connection, team: str) -> None:
        if c.execute(select(teams.c.name).where(teams.c.name == team)).first() is None:
            known = ", ".join(r.name for r in c.execute(select(teams.c.name).order_by(teams.c.name))) or "none"
            raise UnknownTeamError(f"unknown team {team!r} (known: {known}); add it to the budgets file and apply it")

    def _lock_team(self, c: Connection, team: str) -> None:
        # FOR UPDATE serialises every reservation of one team on PostgreSQL; SQLite's
        # BEGIN IMMEDIATE already holds the whole database's write lock (and ignores FOR UPDATE).
        row = c.execute(select(teams.c.name).where(teams.c.name == team).with_for_update()).first()
        if row is None:
            self._require_team(c, team)

    @staticmethod
    def _used(c: Connection, team: str, experiment: str | None, month: str | None) -> float:
        spent_or_held = func.coalesce(reservations.c.actual_usd, 0.0) + reservations.c.reserved_usd
        query = select(func.coalesce(func.sum(spent_or_held), 0.0)).where(
            reservations.c.team == team, reservations.c.status.in_((HELD, *SPENT))
        )
        if experiment:
            query = query.where(reservations.c.experiment == experiment)
        if month:
            query = query.where(reservations.c.month == month)
        return float(c.execute(query).scalar_one())

    @staticmethod
    def _expire_stale(c: Connection, team: str, now: datetime) -> None:
        # A run that crashed without settling (SIGKILL, node loss) must not hold budget forever;
        # past its hold time it is charged what it reserved, the conservative assumption.
        c.execute(
            update(reservations)
            .where(reservations.c.team == team, reservations.c.status == HELD, reservations.c.expires_at < now)
            .values(status="expired", actual_usd=reservations.c.reserved_usd, reserved_usd=0.0, settled_at=now,
                    reason="held past its expiry without settling (crashed run); charged its reservation")
        )
