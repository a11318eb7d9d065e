"""get_training_health_status: can the stack run training now, and what needs a person.

`healthy` answers the first question: Prefect, MLflow and the ledger answer, every pool with
runs due has a worker to take them, and no run is late. Failed runs and Oppen's alerts answer
the second: they are listed (newest first, bounded) but do not make the stack unhealthy, since a
run refused by its budget is the system working.

Nothing here raises for a service that is down: each check becomes a component with `ok=False`
and one line saying why. The reads are independent and run side by side in threads, so the call
costs about as long as its slowest service, and a check that hangs is abandoned after
CHECK_TIMEOUT_S.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field

from oppen import events
from oppen.api import context
from oppen.api.errors import ApiError, InvalidInput
from oppen.cost.money import format_usd, to_micros

# A check that takes longer than this is reported down: a health check must answer while things burn.
CHECK_TIMEOUT_S = 5.0
MAX_LISTED = 20  # late runs, failures and alerts listed (their counts are complete)
MAX_DUE_READ = 200  # due runs read to find late ones and count waiting runs per pool
MAX_WINDOW_H = 24 * 90
ALERT_EVENTS = (
    events.BUDGET_WARNING, events.BUDGET_STOPPED, events.BUDGET_REFUSED,
    events.TRAINING_SLOW, events.GPU_UNDERUTILIZED, events.NOTIFICATION_FAILED,
)


class ComponentHealth(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The service checked: prefect, mlflow or ledger.")
    ok: bool = Field(description="True when it answered a cheap read.")
    detail: str = Field(description="One line: what answered (its address, version or size), or why it did not.")
    latency_ms: float | None = Field(None, description="How long the check took; None when it gave up.")
    version: str | None = Field(None, description="The server's version, where it tells (Prefect).")


class WorkerInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The worker's name.")
    status: str = Field(description="ONLINE or OFFLINE, as Prefect judges from its heartbeats.")
    last_heartbeat: datetime | None = Field(None, description="When it last reported (UTC).")


class PoolHealth(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Work pool name.")
    type: str = Field(description="Work pool type (process, kubernetes, ...).")
    status: str = Field(description="Prefect's pool status: READY, NOT_READY or PAUSED.")
    paused: bool = Field(description="True when the pool hands out no runs.")
    online_workers: int = Field(description="Workers polling this pool now.")
    workers: list[WorkerInfo] = Field(description="Every worker Prefect knows for this pool.")
    due_runs: int = Field(description="Scheduled runs whose start time has come, waiting for a worker "
                          f"(counted among the {MAX_DUE_READ} oldest due runs of all pools).")
    ok: bool = Field(description="False when runs are due and no worker can take them (none online, or paused).")


class LateRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    flow_run_id: str = Field(description="Prefect flow run id.")
    name: str = Field(description="Flow run name.")
    state_name: str = Field(description="Late, or Scheduled/AwaitingRetry past its start time.")
    work_pool: str | None = Field(None, description="Pool it waits in.")
    work_queue: str | None = Field(None, description="Queue it waits in.")
    scheduled_start: datetime = Field(description="When it should have started (UTC).")
    late_by_s: float = Field(description="Seconds past its scheduled start.")


class FailedRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    flow_run_id: str = Field(description="Prefect flow run id.")
    name: str = Field(description="Flow run name.")
    state_type: str = Field(description="FAILED or CRASHED.")
    state_name: str = Field(description="The state's name; Oppen's flows name why (OverBudget, InvalidRequest, "
                            "LedgerUnavailable, ...).")
    message: str = Field(description="The state's message, on one line.")
    ended_at: datetime | None = Field(None, description="When it ended (UTC).")
    work_pool: str | None = Field(None, description="Pool it ran in.")


class Alert(BaseModel):
    model_config = ConfigDict(frozen=True)

    event_id: str = Field(description="Prefect event id.")
    event: str = Field(description="Event name (oppen.budget.warning, oppen.training.slow, ...; see oppen/events.py).")
    occurred: datetime = Field(description="When it happened (UTC).")
    flow_run_id: str | None = Field(None, description="The run it is about, when it is about one.")
    team: str | None = Field(None, description="The team of that run.")
    experiment: str | None = Field(None, description="The experiment of that run.")
    summary: str = Field(description="What happened, on one line, with its figures.")


class HealthStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    healthy: bool = Field(description="True when every service answers, every pool with due runs has a worker, "
                          "and no run is late.")
    checked_at: datetime = Field(description="When this was read (UTC).")
    problems: list[str] = Field(description="One line per thing that makes the stack unhealthy, with what to do.")
    notices: list[str] = Field(description="One line per thing a person should look at that does not stop "
                               "training: recent failures and alerts.")
    components: list[ComponentHealth] = Field(description="Prefect, MLflow and the ledger.")
    pools: list[PoolHealth] = Field(description="Every work pool with its workers; empty when Prefect is down.")
    late_runs: list[LateRun] = Field(description=f"The most overdue runs, at most {MAX_LISTED}.")
    late_count: int = Field(description=f"Late runs among the {MAX_DUE_READ} oldest due runs.")
    failures: list[FailedRun] = Field(description=f"Failed and crashed runs of the window, newest first, at most {MAX_LISTED}.")
    failure_count: int = Field(description="Failed and crashed runs that ended in the window.")
    alerts: list[Alert] = Field(description=f"Oppen events that need a person, newest first, at most {MAX_LISTED}.")
    alert_count: int = Field(description="Such events in the window.")
    window_h: float = Field(description="Hours looked back for failures and alerts.")


def get_training_health_status(late_after_s: float = 60, failures_since_h: float = 24) -> HealthStatus:
    """Prefect, MLflow and the ledger reachable; workers per pool; late runs; recent failures; alerts."""
    if not (isinstance(late_after_s, (int, float)) and math.isfinite(late_after_s) and late_after_s >= 0):
        raise InvalidInput(f"late_after_s must be a number of seconds >= 0, got {late_after_s!r}")
    if not (isinstance(failures_since_h, (int, float)) and math.isfinite(failures_since_h)
            and 0 < failures_since_h <= MAX_WINDOW_H):
        raise InvalidInput(f"failures_since_h must be hours in (0, {MAX_WINDOW_H}], got {failures_since_h!r}")
    now = datetime.now(timezone.utc)
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="oppen-health")
    try:
        checks = {"mlflow": executor.submit(_timed, "mlflow", _check_mlflow),
                  "ledger": executor.submit(_timed, "ledger", _check_ledger)}
        prefect_view = _read_prefect(executor, now, late_after_s, timedelta(hours=failures_since_h))
        components = [prefect_view.component, *(_result(name, future) for name, future in checks.items())]
    finally:
        executor.shutdown(wait=False, cancel_futures=True)  # a check past its deadline is abandoned, not awaited
    problems = [f"{c.name} is down: {c.detail}" for c in components if not c.ok]
    problems += prefect_view.problems
    notices = _notices(prefect_view, failures_since_h)
    return HealthStatus(
        healthy=not problems, checked_at=now, problems=problems, notices=notices, components=components,
        pools=prefect_view.pools, late_runs=prefect_view.late[:MAX_LISTED], late_count=len(prefect_view.late),
        failures=prefect_view.failures, failure_count=prefect_view.failure_count, alerts=prefect_view.alerts,
        alert_count=prefect_view.alert_count, window_h=failures_since_h,
    )


# --- Prefect -------------------------------------------------------------------------------


@dataclass
class _PrefectView:
    """What one pass over the Prefect API found."""

    component: ComponentHealth
    pools: list[PoolHealth] = field(default_factory=list)
    late: list[LateRun] = field(default_factory=list)
    failures: list[FailedRun] = field(default_factory=list)
    failure_count: int = 0
    alerts: list[Alert] = field(default_factory=list)
    alert_count: int = 0
    problems: list[str] = field(default_factory=list)


def _read_prefect(executor: ThreadPoolExecutor, now: datetime, late_after_s: float, window: timedelta) -> _PrefectView:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return _PrefectView(component=ComponentHealth(
            name="prefect", ok=False, detail="PREFECT_API_URL is not set; point it at the Prefect server"))
    started = time.perf_counter()
    try:
        with context.prefect() as client:
            version = str(client.api_version())
            view = _PrefectView(component=ComponentHealth(
                name="prefect", ok=True, detail=f"{url} answered (server {version})", latency_ms=_ms(started),
                version=version))
            failures = executor.submit(_read_failures, client, now - window)
            alerts = executor.submit(_read_alerts, client, now - window, now)
            due = executor.submit(_read_due_runs, client, now)
            pools = client.read_work_pools()
            workers = [executor.submit(client.read_workers_for_work_pool, pool.name) for pool in pools]
            waiting = _late_runs(view, _gathered(view, "due runs", due, []), now, late_after_s)
            for pool, found in zip(pools, workers):
                _pool_health(view, pool, _gathered(view, f"the workers of pool {pool.name}", found, []),
                             waiting.get(pool.name, 0))
            view.failures, view.failure_count = _gathered(view, "failed runs", failures, ([], 0))
            view.alerts, view.alert_count = _gathered(view, "Oppen events", alerts, ([], 0))
            return view
    except Exception as error:  # noqa: BLE001 - health reports, it never raises
        detail = _one_line(error) if isinstance(error, ApiError) else f"{url}: {_one_line(error)}"
        return _PrefectView(component=ComponentHealth(name="prefect", ok=False, detail=detail, latency_ms=_ms(started)))


def _gathered(view: _PrefectView, what: str, future: Future, empty):
    """A read's result; one that failed while the server answered is a problem of its own."""
    try:
        return future.result(timeout=CHECK_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - health reports, it never raises
        view.problems.append(f"Prefect answered but reading {what} failed: {_one_line(error)}")
        return empty


def _read_due_runs(client, now: datetime) -> list:
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterNextScheduledStartTime, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    # One read of the oldest due runs serves both questions: which pools have work waiting, and what is late.
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
            next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=now),
        ),
        sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC, limit=MAX_DUE_READ,
    )


def _late_runs(view: _PrefectView, due: list, now: datetime, late_after_s: float) -> dict[str, int]:
    """Adds the late runs (oldest first) to `view`; returns how many runs are due per pool."""
    waiting: dict[str, int] = {}
    for run in due:
        waiting[run.work_pool_name or ""] = waiting.get(run.work_pool_name or "", 0) + 1
        scheduled = run.next_scheduled_start_time or run.expected_start_time
        if scheduled is None:
            continue
        late_by = (now - scheduled).total_seconds()
        if run.state_name == "Late" or late_by > late_after_s:
            view.late.append(LateRun(flow_run_id=str(run.id), name=run.name, state_name=run.state_name or "Scheduled",
                                     work_pool=run.work_pool_name, work_queue=run.work_queue_name,
                                     scheduled_start=scheduled, late_by_s=round(late_by, 1)))
    if view.late:
        oldest = view.late[0]
        view.problems.append(
            f"{len(view.late)} run(s) late; the oldest, {oldest.name} ({oldest.flow_run_id}), is {_duration(oldest.late_by_s)} "
            f"past its start in pool {oldest.work_pool or '?'}: check that pool's workers and concurrency limits")
    return waiting


def _pool_health(view: _PrefectView, pool, workers: list, due: int) -> None:
    from prefect.client.schemas.objects import WorkerStatus

    online = sum(1 for worker in workers if worker.status == WorkerStatus.ONLINE)
    if due and pool.is_paused:
        view.problems.append(f"pool {pool.name} is paused with {due} run(s) due; resume it "
                             f"(`prefect work-pool resume {pool.name}`) or cancel them")
    elif due and not online:
        view.problems.append(f"pool {pool.name} has {due} run(s) due and no online worker; start one "
                             f"(`prefect worker start --pool {pool.name}`)")
    view.pools.append(PoolHealth(
        name=pool.name, type=pool.type, status=pool.status.value if pool.status else "UNKNOWN", paused=pool.is_paused,
        online_workers=online, due_runs=due, ok=not (due and (pool.is_paused or not online)),
        workers=[WorkerInfo(name=w.name, status=w.status.value, last_heartbeat=w.last_heartbeat_time) for w in workers],
    ))


def _read_failures(client, since: datetime) -> tuple[list[FailedRun], int]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterEndTime, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    failed = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.FAILED, StateType.CRASHED])),
        end_time=FlowRunFilterEndTime(after_=since),
    )
    runs = client.read_flow_runs(flow_run_filter=failed, sort=FlowRunSort.END_TIME_DESC, limit=MAX_LISTED)
    count = client.count_flow_runs(flow_run_filter=failed) if len(runs) == MAX_LISTED else len(runs)
    return [
        FailedRun(flow_run_id=str(run.id), name=run.name, state_type=run.state_type.value if run.state_type else "FAILED",
                  state_name=run.state_name or "Failed", message=_one_line(run.state.message or "") if run.state else "",
                  ended_at=run.end_time, work_pool=run.work_pool_name)
        for run in runs
    ], count


def _read_alerts(client, since: datetime, until: datetime) -> tuple[list[Alert], int]:
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter, EventOrder

    page = client.read_events(
        filter=EventFilter(occurred=EventOccurredFilter(since=since, until=until),
                           event=EventNameFilter(name=list(ALERT_EVENTS)), order=EventOrder.DESC),
        limit=MAX_LISTED,
    )
    return [_alert(event) for event in page.events], page.total


def _alert(event) -> Alert:
    resource = event.resource
    run_id = resource.id.removeprefix("oppen.run.") if resource.id.startswith("oppen.run.") else None
    return Alert(event_id=str(event.id), event=event.event, occurred=event.occurred,
                 flow_run_id=None if run_id == "adhoc" else run_id, team=resource.get("oppen.team"),
                 experiment=resource.get("oppen.experiment"), summary=alert_summary(event.event, dict(event.payload)))


def alert_summary(name: str, payload: dict) -> str:
    """One line a person reads, from an alert's payload (the fields oppen/events.py lists for it)."""
    try:
        if name == events.BUDGET_WARNING:
            return (f"{payload['scope']} budget at {payload['fraction']:.0%}: {_usd(payload['used_usd'])} used of "
                    f"{_usd(payload['amount_usd'])}, this run asks {_usd(payload['request_usd'])}")
        if name in (events.BUDGET_STOPPED, events.BUDGET_REFUSED):
            return _one_line(str(payload["reason"]))
        if name == events.TRAINING_SLOW:
            return (f"epoch {payload['epoch']} took {payload['epoch_seconds']:.0f} s, {payload['ratio']:.1f}x the "
                    f"{payload['expected_seconds']:.0f} s expected")
        if name == events.GPU_UNDERUTILIZED:
            return (f"GPU utilisation {payload['gpu_utilization']:.0%} (below {payload['threshold']:.0%}) on "
                    f"{payload['gpus']} GPU(s): {payload['advice']}")
        if name == events.NOTIFICATION_FAILED:
            return f"{payload['message_kind']} message to {payload['channel']} not delivered: {_one_line(str(payload['error']))}"
    except (KeyError, TypeError, ValueError):
        pass  # an event from an older or newer Oppen: show its fields as they are
    return _one_line(", ".join(f"{key}={value}" for key, value in payload.items() if key != "links"))


def _notices(view: _PrefectView, window_h: float) -> list[str]:
    notices = []
    if view.failure_count:
        latest = view.failures[0]
        notices.append(f"{view.failure_count} failed or crashed run(s) in the last {window_h:g} h; the latest, "
                       f"{latest.name} ({latest.flow_run_id}): {latest.state_name}: {latest.message or 'no message'}")
    if view.alert_count:
        latest = view.alerts[0]
        notices.append(f"{view.alert_count} alert(s) in the last {window_h:g} h; the latest, {latest.event}: {latest.summary}")
    return notices


# --- MLflow and the ledger (run in threads) --------------------------------------------------


def _check_mlflow() -> tuple[str, str | None]:
    config = context.settings()  # read here: a malformed OPPEN_* variable is this check's finding
    uri = config.tracking_uri
    if uri.startswith(("http://", "https://")):
        # MLflow's client retries an unreachable server with backoff for minutes; ask its /health first.
        httpx.get(f"{uri.rstrip('/')}/health", timeout=CHECK_TIMEOUT_S).raise_for_status()
    context.mlflow(config).search_experiments(max_results=1)
    return f"{_redacted(uri)} answered", None


def _check_ledger() -> tuple[str, str | None]:
    config = context.settings()
    with context.ledger(config) as ledger:
        teams = ledger.team_names()
    return f"{_redacted(config.ledger)} answered ({len(teams)} team(s))", None


def _timed(name: str, check) -> ComponentHealth:
    started = time.perf_counter()
    try:
        detail, version = check()
        return ComponentHealth(name=name, ok=True, detail=detail, latency_ms=_ms(started), version=version)
    except Exception as error:  # noqa: BLE001 - health reports, it never raises
        return ComponentHealth(name=name, ok=False, detail=_one_line(error), latency_ms=_ms(started))


def _result(name: str, future: Future) -> ComponentHealth:
    try:
        return future.result(timeout=CHECK_TIMEOUT_S)
    except FutureTimeout:
        return ComponentHealth(name=name, ok=False, detail=f"no answer within {CHECK_TIMEOUT_S:g} s")


# --- small helpers ---------------------------------------------------------------------------


def _redacted(uri: str) -> str:
    """The address without a password, for database URLs and http ones alike."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _one_line(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split()) or type(value).__name__
    if isinstance(value, BaseException) and not isinstance(value, ApiError):  # ours already read as a sentence
        text = f"{type(value).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


def _usd(amount: float) -> str:
    return format_usd(to_micros(amount))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
