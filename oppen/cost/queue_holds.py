"""Holds of queued runs: a run created but not started holds its quote against its budgets.

Without them, a queue of runs each quoted against the same remaining budget would all be accepted,
and all but the first refused once they start, after waiting their turn. With them, queuing is a
promise the budgets can keep. A queue hold is never charged: the run's first reservation takes it
over in the same transaction (`adopt`), a cancellation releases it, and one whose run never started
simply lapses at its expiry (nothing ran, so nothing is owed).

These helpers run inside the ledger's write transaction, after the team's lock is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from oppen.cost.ledger_schema import queue_holds
from oppen.cost.money import Micros

HELD = "held"
STARTED = "started"  # its run reserved: the attempt's own hold replaced this one
CANCELLED = "cancelled"
LAPSED = "expired"


@dataclass(frozen=True)
class QueueHold:
    run_key: str
    team: str
    experiment: str
    workload: str
    queue: str
    held_micros: Micros
    quote_micros: Micros | None
    expected_seconds: int | None
    status: str
    reason: str | None
    created_at: datetime
    expires_at: datetime
    closed_at: datetime | None

    @property
    def accepted(self) -> bool:
        return self.status == HELD


def as_hold(row) -> QueueHold:
    return QueueHold(**{column: getattr(row, column) for column in QueueHold.__dataclass_fields__})


def held_micros(c: Connection, team: str, experiment: str | None) -> Micros:
    query = select(func.coalesce(func.sum(queue_holds.c.held_micros), 0)).where(
        queue_holds.c.team == team, queue_holds.c.status == HELD)
    if experiment:
        query = query.where(queue_holds.c.experiment == experiment)
    return int(c.execute(query).scalar_one())


def adopt(c: Connection, run_key: str, now: datetime,
          reason: str = "the run started and reserved for itself") -> Micros:
    """The run has started: its queue hold is over (its attempt holds for it from now on, or it was refused)."""
    row = c.execute(select(queue_holds).where(queue_holds.c.run_key == run_key, queue_holds.c.status == HELD)).first()
    if row is None:
        return 0
    c.execute(update(queue_holds).where(queue_holds.c.run_key == run_key)
              .values(status=STARTED, closed_at=now, reason=reason))
    return int(row.held_micros)


def lapse_stale(c: Connection, now: datetime, team: str | None) -> list[str]:
    """Queue holds past their expiry stop counting; nothing ran, so nothing is charged."""
    query = select(queue_holds.c.run_key).where(queue_holds.c.status == HELD, queue_holds.c.expires_at < now)
    if team:
        query = query.where(queue_holds.c.team == team)
    stale = [row.run_key for row in c.execute(query)]
    if stale:
        c.execute(update(queue_holds).where(queue_holds.c.run_key.in_(stale)).values(
            status=LAPSED, closed_at=now, reason="queued past its expiry without starting; released, nothing charged"))
    return stale
