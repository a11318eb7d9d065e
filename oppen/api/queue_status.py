"""What waits in the work pools' queues: pending runs in the order they will start, their ETAs and queued cost.

Read from Prefect (pools, queues, their limits, scheduled/pending/running flow runs) and the ledger
(each queued run's quote and hold). ETAs come from `queue_eta`: a run queued without going through
`oppen.api` (e.g. `prefect deployment run`) has no quote, and the ETAs behind it are lower bounds.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field

from oppen.api import context
from oppen.api.errors import NotFound
from oppen.api.queue_eta import Pending, Running, estimate
from oppen.cost.money import usd_float
from oppen.cost.queue_holds import HELD, QueueHold

PAGE = 200
MOST_RUNS = 5000  # a queue deeper than this is an incident, not a status page


class QueuedRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    name: str
    pool: str
    queue: str
    state: str
    position: int
    eta: datetime | None = Field(description="Expected start (UTC); None when the pool takes no runs.")
    eta_exact: bool = Field(description="False: a run ahead has no quote, so the ETA is a lower bound.")
    scheduled: datetime
    waiting_s: float = Field(description="Seconds since it became due (0 for a run scheduled later).")
    team: str | None
    expected_micros: int | None = Field(description="Its quote's expected cost; None: not quoted.")
    expected_usd: float | None
    expected_seconds: float | None
    held_micros: int
    held_usd: float


class RunningRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    name: str
    pool: str
    queue: str
    started: datetime | None
    expected_end: datetime | None


class QueueSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    pool: str
    queue: str
    priority: int
    concurrency_limit: int | None
    paused: bool
    pending: int
    running: int
    queued_cost_micros: int = Field(description="Sum of the pending runs' expected costs (quoted ones).")
    queued_cost_usd: float
    held_micros: int = Field(description="What the pending runs hold of their budgets.")
    held_usd: float
    unquoted: int = Field(description="Pending runs with no quote (queued outside oppen, or no history).")
    oldest_wait_s: float


class QueueStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    generated_at: datetime
    queues: list[QueueSummary]
    pending: list[QueuedRun] = Field(description="In the order they will start, per pool.")
    running: list[RunningRun]
    total_queued_cost_micros: int
    total_queued_cost_usd: float
    total_held_micros: int
    total_held_usd: float


def get_job_queue_status(pool: str | None = None) -> QueueStatus:
    """Pending runs per queue with positions and ETAs, what is running, and the total queued cost."""
    with context.prefect() as client:
        pools = [_read_pool(client, pool)] if pool else client.read_work_pools()
        # One query for every pool and state (a few pages), split here: each request costs the server a scan.
        found = _runs(client, [p.name for p in pools], [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING])
        flow_runs = {p.name: _split([run for run in found if run.work_pool_name == p.name]) for p in pools}
        queues = {p.name: client.read_work_queues(work_pool_name=p.name) for p in pools}
    keys = [str(run.id) for pending, running in flow_runs.values() for run in (*pending, *running)]
    with context.ledger() as ledger:
        holds = {hold.run_key: hold for hold in ledger.queue_holds(status=None, run_keys=keys)} if keys else {}
    now = datetime.now(timezone.utc)
    summaries, all_pending, all_running = [], [], []
    for work_pool in pools:
        pending, running = flow_runs[work_pool.name]
        rows, runs_now = _pool_rows(work_pool, queues[work_pool.name], pending, running, holds, now)
        all_pending += rows
        all_running += runs_now
        summaries += _summaries(work_pool, queues[work_pool.name], rows, runs_now, now)
    queued = sum(s.queued_cost_micros for s in summaries)
    held = sum(s.held_micros for s in summaries)
    return QueueStatus(generated_at=now, queues=summaries, pending=all_pending, running=all_running,
                       total_queued_cost_micros=queued, total_queued_cost_usd=usd_float(queued),
                       total_held_micros=held, total_held_usd=usd_float(held))


def position_of(client: SyncPrefectClient, flow_run_id: str) -> tuple[int | None, datetime | None]:
    """A pending run's place in its pool's start order and its ETA (None, None once it started)."""
    flow_run = client.read_flow_run(context.flow_run_uuid(flow_run_id))
    if flow_run.work_pool_name is None:
        return None, None
    work_pool = client.read_work_pool(flow_run.work_pool_name)
    pending, running = _split(_runs(client, [work_pool.name], [StateType.SCHEDULED, StateType.PENDING,
                                                                StateType.RUNNING]))
    keys = [str(run.id) for run in (*pending, *running)]
    with context.ledger() as ledger:
        holds = {hold.run_key: hold for hold in ledger.queue_holds(status=None, run_keys=keys)} if keys else {}
    rows, _ = _pool_rows(work_pool, client.read_work_queues(work_pool_name=work_pool.name), pending, running, holds,
                         datetime.now(timezone.utc))
    mine = next((row for row in rows if row.flow_run_id == flow_run_id), None)
    return (mine.position, mine.eta) if mine and mine.scheduled <= datetime.now(timezone.utc) else (None, mine and mine.eta)


def _read_pool(client: SyncPrefectClient, name: str):
    try:
        return client.read_work_pool(name)
    except ObjectNotFound:
        raise NotFound(f"no work pool {name!r} on this Prefect server; `prefect work-pool ls` lists them") from None


def _split(runs: list) -> tuple[list, list]:
    """(pending, running), each in expected start order."""
    return ([run for run in runs if run.state_type != StateType.RUNNING],
            [run for run in runs if run.state_type == StateType.RUNNING])


def _runs(client: SyncPrefectClient, pools: list[str], types: list[StateType]) -> list:
    if not pools:
        return []
    found, offset = [], 0
    while offset < MOST_RUNS:
        page = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=types))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=pools)),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=PAGE, offset=offset,
        )
        found += page
        if len(page) < PAGE:
            break
        offset += PAGE
    return found


def _expected(hold: QueueHold | None) -> float | None:
    return float(hold.expected_seconds) if hold is not None and hold.expected_seconds is not None else None


def _pool_rows(work_pool, queues, pending, running, holds: dict[str, QueueHold], now: datetime):
    priority = {queue.name: queue.priority for queue in queues}
    lowest = max(priority.values(), default=1) + 1
    by_id = {str(run.id): run for run in pending}
    slots = None if work_pool.concurrency_limit is None else (0 if work_pool.is_paused else work_pool.concurrency_limit)
    etas = estimate(
        [Pending(key, priority.get(run.work_queue_name or "", lowest), _due(run, now), _expected(holds.get(key)))
         for key, run in by_id.items()],
        [Running(str(run.id), run.start_time or now, _expected(holds.get(str(run.id)))) for run in running],
        slots, now,
    )
    rows = []
    for eta in etas:
        run, hold = by_id[eta.id], holds.get(eta.id)
        held = hold.held_micros if hold is not None and hold.status == HELD else 0
        due = _due(run, now)
        rows.append(QueuedRun(
            flow_run_id=eta.id, name=run.name, pool=work_pool.name, queue=run.work_queue_name or "",
            state=run.state.name if run.state else "Scheduled", position=eta.position, eta=eta.start,
            eta_exact=eta.exact, scheduled=due, waiting_s=max(0.0, (now - due).total_seconds()),
            team=hold.team if hold else None,
            expected_micros=hold.quote_micros if hold else None,
            expected_usd=usd_float(hold.quote_micros) if hold and hold.quote_micros is not None else None,
            expected_seconds=_expected(hold), held_micros=held, held_usd=usd_float(held),
        ))
    runs_now = []
    for run in running:
        seconds = _expected(holds.get(str(run.id)))
        end = run.start_time + timedelta(seconds=seconds) if run.start_time and seconds is not None else None
        runs_now.append(RunningRun(flow_run_id=str(run.id), name=run.name, pool=work_pool.name,
                                   queue=run.work_queue_name or "", started=run.start_time, expected_end=end))
    return rows, runs_now


def _summaries(work_pool, queues, rows: list[QueuedRun], running: list[RunningRun], now: datetime) -> list[QueueSummary]:
    summaries = []
    for queue in sorted(queues, key=lambda q: q.priority):
        mine = [row for row in rows if row.queue == queue.name]
        quoted = sum(row.expected_micros for row in mine if row.expected_micros is not None)
        held = sum(row.held_micros for row in mine)
        summaries.append(QueueSummary(
            pool=work_pool.name, queue=queue.name, priority=queue.priority, concurrency_limit=queue.concurrency_limit,
            paused=bool(queue.is_paused or work_pool.is_paused), pending=len(mine),
            running=sum(1 for run in running if run.queue == queue.name),
            queued_cost_micros=quoted, queued_cost_usd=usd_float(quoted), held_micros=held, held_usd=usd_float(held),
            unquoted=sum(1 for row in mine if row.expected_micros is None),
            oldest_wait_s=max((row.waiting_s for row in mine), default=0.0),
        ))
    return summaries


def _due(run, now: datetime) -> datetime:
    return run.expected_start_time or run.next_scheduled_start_time or run.created or now
