"""When will each pending run start? A small simulation of a pool's slots, in the order workers take runs.

Prefect's workers take ready runs by queue priority (urgent before normal before background), then by
their scheduled time; a pool with a concurrency limit runs at most that many at once. Each slot is
free when its running run ends (its start plus its quoted duration); each pending run starts on the
first free slot, never before its scheduled time, and holds it for its quoted duration. A run with no
quote (no speed history) cannot be timed: it is placed, and the ETAs behind it are lower bounds.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Pending:
    id: str
    queue_priority: int  # 1 is served first
    scheduled: datetime
    expected_seconds: float | None


@dataclass(frozen=True)
class Running:
    id: str
    started: datetime
    expected_seconds: float | None


@dataclass(frozen=True)
class Eta:
    id: str
    position: int  # 1 is next
    start: datetime | None  # None: the pool takes no runs (its limit is 0, or it is paused)
    exact: bool  # False: a run ahead of it has no quote, so this is a lower bound


def order(pending: list[Pending]) -> list[Pending]:
    return sorted(pending, key=lambda run: (run.queue_priority, run.scheduled, run.id))


def _slot_free_times(running: list[Running], slots: int, now: datetime) -> list[tuple[datetime, bool]]:
    """When each of the pool's slots frees. With more runs running than slots (a lowered limit), a new run
    starts only once enough of them ended: the k-th slot frees when the (n - slots + k)-th run ends."""
    ends = sorted((max(now, run.started + timedelta(seconds=run.expected_seconds)), True)
                  if run.expected_seconds is not None else (now, False) for run in running)
    if len(ends) >= slots:
        return ends[len(ends) - slots:]
    return ends + [(now, True)] * (slots - len(ends))


def estimate(pending: list[Pending], running: list[Running], slots: int | None, now: datetime) -> list[Eta]:
    """Start estimates in the order the runs will start. `slots=None`: no limit, so a ready run starts now."""
    ordered = order(pending)
    if slots == 0:
        return [Eta(run.id, position, None, False) for position, run in enumerate(ordered, start=1)]
    if slots is None:
        return [Eta(run.id, position, max(now, run.scheduled), True) for position, run in enumerate(ordered, start=1)]
    free = _slot_free_times(running, slots, now)
    heapq.heapify(free)
    etas = []
    for position, run in enumerate(ordered, start=1):
        slot_free, exact = heapq.heappop(free)
        start = max(slot_free, run.scheduled)
        heapq.heappush(free, (start + timedelta(seconds=run.expected_seconds or 0.0),
                              exact and run.expected_seconds is not None))
        etas.append(Eta(run.id, position, start, exact))
    return etas
