"""Money and usage reports: the cost report, budget quotas, and what the resources paid for were used for.

The cost report is the cost-report flow's analysis (oppen.cost.report's build_frame, summarize and
trend over the ledger's rows) without running a flow. The ledger gives the money and, for runs settled
with their metric in the settlement's detail, the quality too: cost per point is worked out from the
run's exact total as the settlement works it out, so no MLflow call is needed. Only runs the ledger
cannot price (booked by an older version, or a lower-is-better metric whose untrained baseline the
ledger does not keep) are looked up in MLflow, a hundred runs a request (MLflow loads every param and
metric of each run it returns: about 8 ms a run on SQLite).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, time, timedelta, timezone

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import ViewType
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from oppen import tracking_keys as keys
from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound
from oppen.api.moments import as_utc
from oppen.cost.ledger import Ledger, month_of, utcnow
from oppen.cost.money import Micros, to_micros, usd_float
from oppen.cost.policy import NAME_PATTERN, CostPolicy
from oppen.cost.report import build_frame, summarize, trend
from oppen.cost.settlement import points_of

DEFAULT_DAYS = 30  # the cost-report flow's default window
QUALITY_METRICS = ("test_accuracy", "eval_perplexity")  # the flows' primary test metric, as the flow reads it
# Higher-is-better metrics: their points come from the value alone (oppen.cost.settlement.points_of), so the
# ledger's detail prices them. Perplexity's points are gained below the untrained model's, which it does not keep.
LEDGER_PRICED_METRICS = frozenset({"test_accuracy"})
RUN_ID_CHUNK = 100  # run ids per MLflow `run_id IN (...)` filter
WARN_FRACTION = CostPolicy.model_fields["warn_fraction"].default  # where runs start emitting budget warnings
MAX_UTILIZATION_RUNS = 5000
# The ledger's final run statuses, as MLflow names how the run ended (refused and expired runs never trained).
LEDGER_RUN_STATUS = {"settled": "FINISHED", "stopped": "FINISHED", "failed": "FAILED", "preempted": "KILLED"}


class ReportWindow(BaseModel):
    """A report's time range: dates cover whole UTC days (the end day included), datetimes are exact."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    start: datetime | date | None = Field(None, description=f"From (UTC); None: {DEFAULT_DAYS} days before the end.")
    end: datetime | date | None = Field(None, description="Until (UTC; a date includes that day); None: now.")

    @model_validator(mode="after")
    def _ordered(self) -> ReportWindow:
        since, until = self.bounds()
        if until <= since:
            end = self.end if self.end is not None else "now"
            start = self.start if self.start is not None else f"{DEFAULT_DAYS} days before the end"
            raise ValueError(f"the range is empty: end {end} is not after start {start}")
        return self

    def bounds(self) -> tuple[datetime, datetime]:
        until = _instant(self.end, end=True) if self.end is not None else utcnow()
        since = _instant(self.start, end=False) if self.start is not None else until - timedelta(days=DEFAULT_DAYS)
        return since, until


def window(start, end) -> tuple[datetime, datetime]:
    try:
        return ReportWindow(start=start, end=end).bounds()
    except ValidationError as error:
        first = error.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else ""  # the field, not the union member that failed
        message = first["msg"].removeprefix("Value error, ")
        raise InvalidInput(f"bad report range: {where + ': ' if where else ''}{message}") from None


def _instant(value: datetime | date, end: bool) -> datetime:
    if isinstance(value, datetime):
        return as_utc(value)
    day = value + timedelta(days=1) if end else value
    return datetime.combine(day, time(), tzinfo=timezone.utc)


# --- budgets ------------------------------------------------------------------------------


class BudgetStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    team: str = Field(description="The team that pays.")
    experiment: str | None = Field(None, description="The experiment this budget covers; None: the whole team.")
    period: str = Field(description="total (for the budget's life) or monthly (calendar month, UTC).")
    month: str | None = Field(None, description="The month a monthly budget is counted in (YYYY-MM, UTC).")
    limit_micros: Micros = Field(description="The budget, in micro-dollars.")
    limit_usd: float = Field(description="The budget, in dollars.")
    spent_micros: Micros = Field(description="Booked charges in scope (this month, when monthly).")
    spent_usd: float = Field(description="Booked charges in dollars.")
    held_micros: Micros = Field(description="Held by runs still running or queued (counts against every month).")
    held_usd: float = Field(description="Held, in dollars.")
    used_micros: Micros = Field(description="spent + held: what the budget cannot give to a new run.")
    used_usd: float = Field(description="Used, in dollars.")
    remaining_micros: Micros = Field(description="limit - used, never below 0.")
    remaining_usd: float = Field(description="Remaining, in dollars.")
    fraction_used: float = Field(description="used / limit (may exceed 1 when a run cost more than it held).")
    state: str = Field(description=f"ok, warning (at or above {WARN_FRACTION:.0%}, where runs start warning) "
                       "or exhausted (nothing left for a new run).")


class QuotaStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    team: str = Field(description="The team.")
    checked_at: datetime = Field(description="When the ledger was read (UTC).")
    budgets: list[BudgetStatus] = Field(description="The team-wide budget first, then one per experiment.")
    tightest: BudgetStatus | None = Field(None, description="The budget with the largest fraction used.")


def check_training_quota(team: str) -> QuotaStatus:
    """Every budget of the team (team-wide and per experiment): used (spent + held), limit and remaining."""
    with context.ledger() as ledger:
        known = ledger.team_names()
        if team not in known:
            raise NotFound(f"unknown team {team!r}; known teams: {', '.join(known) or 'none'} "
                           "(teams come from the budgets file: `oppen budgets apply`)")
        now = utcnow()
        budgets = budget_statuses(ledger, team, now)
    return QuotaStatus(team=team, checked_at=now, budgets=budgets,
                       tightest=max(budgets, key=lambda b: b.fraction_used, default=None))


def budget_statuses(ledger: Ledger, team: str, now: datetime, experiment: str | None = None) -> list[BudgetStatus]:
    """The team's budgets as they stand at `now`; with `experiment`, only those a run of it answers to."""
    month = month_of(now)
    found = []
    for budget in ledger.budgets_of(team):
        scope = budget["experiment"] or None
        if experiment is not None and scope not in (None, experiment):
            continue
        monthly = budget["period"] == "monthly"
        spent, held = ledger.usage(team, scope, month if monthly else None)
        limit = int(budget["amount_micros"])
        used = spent + held
        fraction = used / limit if limit else float("inf")
        remaining = max(0, limit - used)
        found.append(BudgetStatus(
            team=team, experiment=scope, period=budget["period"], month=month if monthly else None,
            limit_micros=limit, limit_usd=usd_float(limit), spent_micros=spent, spent_usd=usd_float(spent),
            held_micros=held, held_usd=usd_float(held), used_micros=used, used_usd=usd_float(used),
            remaining_micros=remaining, remaining_usd=usd_float(remaining), fraction_used=fraction,
            state="exhausted" if remaining == 0 else "warning" if fraction >= WARN_FRACTION else "ok",
        ))
    return found


# --- the cost report ---------------------------------------------------------------------


class ScopeCost(BaseModel):
    model_config = ConfigDict(frozen=True)

    team: str = Field(description="The team that paid.")
    experiment: str = Field(description="The experiment.")
    runs: int = Field(description="Runs that spent money in the range.")
    actual_micros: Micros = Field(description="What they cost, exact (the ledger's sum).")
    actual_usd: float = Field(description="What they cost, in dollars.")
    quote_micros: Micros = Field(description="What they were quoted (each run's latest quote).")
    quote_usd: float = Field(description="Quoted, in dollars.")
    actual_over_quote: float | None = Field(None, description="actual / quote; None when nothing was quoted.")
    mean_cost_per_point_usd: float | None = Field(None, description="Mean cost per quality point (accuracy "
                                                  "percentage point, or perplexity point gained) over the runs "
                                                  "that were evaluated.")


class CostReportResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: datetime = Field(description="First instant covered (UTC).")
    end: datetime = Field(description="End of the range, excluded (UTC).")
    team: str | None = Field(None, description="The team reported on; None: every team.")
    experiment: str | None = Field(None, description="The experiment reported on; None: every experiment.")
    runs: int = Field(description="Runs that spent money (refused and still-running runs are left out).")
    total_micros: Micros = Field(description="Total spent, exact: the ledger's integer sum.")
    total_usd: float = Field(description="Total spent, in dollars.")
    quote_micros: Micros = Field(description="Total quoted for the same runs.")
    quote_usd: float = Field(description="Total quoted, in dollars.")
    by_scope: list[ScopeCost] = Field(description="Totals per team and experiment, most expensive first.")
    trend: str = Field(description="Cost per quality point over the runs in time order: improving, degrading, "
                       "flat, or why there is no trend.")
    trend_slope: float | None = Field(None, description="Relative change of cost per point per run (-0.05: 5% cheaper "
                                      "per run); None without a trend.")
    budgets: list[BudgetStatus] = Field(description="The budgets of the teams reported on, as they stand now.")


def generate_cost_report(start: datetime | date | None = None, end: datetime | date | None = None,
                         team: str | None = None, experiment: str | None = None) -> CostReportResult:
    """Spend per team and experiment in a range (ledger), with quality (MLflow), trend and budgets."""
    since, until = window(start, end)
    now = utcnow()
    with context.ledger() as ledger:
        known = ledger.team_names()
        if team is not None and team not in known:
            raise NotFound(f"unknown team {team!r}; known teams: {', '.join(known) or 'none'}")
        rows = ledger.rows(team=team, experiment=experiment, since=since, until=until)
        budgets = [status for name in ([team] if team else known)
                   for status in budget_statuses(ledger, name, now, experiment)]
    frame = build_frame(rows, quality_of_rows(rows))
    quotes = {row["id"]: int(row["quote_micros"]) for row in rows}
    frame["quote_micros"] = frame["reservation_id"].map(quotes).astype("int64")
    direction, slope = trend(frame)
    total, quoted = int(frame["actual_micros"].sum()), int(frame["quote_micros"].sum())
    return CostReportResult(
        start=since, end=until, team=team, experiment=experiment, runs=len(frame),
        total_micros=total, total_usd=usd_float(total), quote_micros=quoted, quote_usd=usd_float(quoted),
        by_scope=_scopes(frame), trend=direction, trend_slope=slope, budgets=budgets,
    )


def _scopes(frame: pd.DataFrame) -> list[ScopeCost]:
    if frame.empty:
        return []
    # summarize() orders the scopes and averages cost per point; the exact sums come from the integer columns.
    micros = frame.groupby(["team", "experiment"])[["actual_micros", "quote_micros"]].sum()
    scopes = []
    for row in summarize(frame).itertuples(index=False):
        actual, quote = (int(value) for value in micros.loc[(row.team, row.experiment)])
        per_point = row.mean_cost_per_point_usd
        scopes.append(ScopeCost(
            team=row.team, experiment=row.experiment, runs=int(row.runs), actual_micros=actual,
            actual_usd=usd_float(actual), quote_micros=quote, quote_usd=usd_float(quote),
            actual_over_quote=actual / quote if quote else None,
            mean_cost_per_point_usd=None if pd.isna(per_point) else float(per_point),
        ))
    return scopes


Quality = tuple[str | None, float | None, float | None]  # (metric, value, cost per point in dollars)
NO_QUALITY: Quality = (None, None, None)  # what build_frame takes for a run it has no quality for


def quality_of_rows(rows: Iterable[Mapping], client: MlflowClient | None = None) -> dict[str, Quality]:
    """MLflow run id -> quality for the ledger's rows: from the ledger where it can say, else from MLflow."""
    quality: dict[str, Quality] = {}
    unknown = []
    for row in rows:
        run_id = row.get("mlflow_run_id")
        if not run_id or row["status"] in ("refused", "reserved"):
            continue  # build_frame leaves these out, or has nothing to join them on
        booked = ledger_quality(row)
        if booked is None:
            unknown.append(run_id)
        else:
            quality[run_id] = booked
    if unknown:
        quality |= quality_of(client or context.mlflow(), unknown)
    return quality


def ledger_quality(row: Mapping) -> Quality | None:
    """The run's quality as its last settlement booked it; None when the ledger cannot say (ask MLflow).

    The figure is the one the settlement logs to MLflow as `cost_per_point_usd`: the run's total
    (every attempt, the ledger's exact sum) over the points its metric bought, None when either is nothing.
    """
    detail = _detail_of(row)
    # Older settlements did not book the metric; a detail from an attempt before the last (a late settle
    # of an attempt that had died) is not the metric the run ended with.
    if "metric" not in detail or detail.get("attempt") != row.get("attempts"):
        return None
    metric, value = detail["metric"], detail.get("value")
    if metric is None or value is None:
        return NO_QUALITY  # failed or preempted: nothing was evaluated, so MLflow has no cost per point either
    if metric not in LEDGER_PRICED_METRICS:
        return None
    points = points_of(metric, float(value), True, None)
    spent = int(row["spent_micros"])
    return metric, float(value), usd_float(spent) / points if points and spent else None


def _detail_of(row: Mapping) -> dict:
    detail = row.get("detail")
    if isinstance(detail, str):
        try:
            detail = json.loads(detail)
        except ValueError:
            return {}
    return detail if isinstance(detail, dict) else {}


def quality_of(client: MlflowClient, run_ids: Iterable[str | None]) -> dict[str, Quality]:
    """MLflow run id -> (metric, value, cost per point), as the cost-report flow reads them, a hundred runs a request.

    Runs MLflow no longer has (deleted, or its store reset) are simply absent: the ledger's money still counts.
    """
    wanted = sorted({run_id for run_id in run_ids if run_id and run_id.isalnum()})  # MLflow ids are hex
    if not wanted:
        return {}
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    quality = {}
    for first in range(0, len(wanted), RUN_ID_CHUNK):
        chunk = wanted[first:first + RUN_ID_CHUNK]
        found = client.search_runs(experiments, filter_string="attributes.run_id IN ({})".format(
            ", ".join(f"'{run_id}'" for run_id in chunk)), run_view_type=ViewType.ALL,
            max_results=len(chunk))
        for run in found:
            metrics = run.data.metrics
            name = next((name for name in QUALITY_METRICS if keys.metric_key(name) in metrics), None)
            if name is not None:
                quality[run.info.run_id] = (name, metrics[keys.metric_key(name)], metrics.get(keys.COST_PER_POINT))
    return quality


# --- resource utilisation ------------------------------------------------------------------


class RunUtilization(BaseModel):
    model_config = ConfigDict(frozen=True)

    mlflow_run_id: str = Field(description="MLflow run id.")
    flow_run_id: str | None = Field(None, description="Prefect flow run id (the ledger's run key).")
    experiment: str = Field(description="MLflow experiment name.")
    team: str | None = Field(None, description="The team that paid.")
    workload: str = Field(description="mnist, lm, ...")
    status: str = Field(description="How the run ended, as MLflow says it: FINISHED (settled or stopped at its cap), "
                        "FAILED, or KILLED (preempted and not resumed).")
    started_at: datetime = Field(description="When it started (UTC): its reservation (MLflow's start, for runs "
                                 "the ledger has no figures of).")
    seconds: float = Field(description="Seconds billed (peak + off-peak).")
    gpus: int = Field(description="GPUs requested.")
    gpu_type: str | None = Field(None, description="GPU type requested.")
    cpu_cores: float = Field(description="CPU cores requested.")
    memory_gib: float = Field(description="Memory requested, GiB (0: not requested).")
    cpu_cores_mean: float | None = Field(None, description="CPU cores busy on average.")
    cpu_cores_peak: float | None = Field(None, description="CPU cores busy at the peak sample.")
    memory_peak_gib: float | None = Field(None, description="Peak resident memory, GiB (data-loader workers included).")
    gpu_util_mean: float | None = Field(None, description="Mean GPU utilisation, 0-1 (None without a GPU or NVML).")
    gpu_memory_peak_gib: float | None = Field(None, description="Peak GPU memory allocated, GiB.")
    billed_device: str = Field(description="gpu when GPUs were requested (they dominate the price), else cpu.")
    utilization: float | None = Field(None, description="Utilisation of the billed device, 0-1: GPU utilisation, "
                                      "or CPU cores busy / cores requested; None when not measured.")
    cost_micros: Micros = Field(description="What the run cost: the ledger's figure (MLflow's cost/total_usd).")
    cost_usd: float = Field(description="What the run cost, in dollars.")
    idle_micros: Micros | None = Field(None, description="Money spent on idle capacity: cost x (1 - utilization).")
    idle_usd: float | None = Field(None, description="Idle money, in dollars.")


class TeamUtilization(BaseModel):
    model_config = ConfigDict(frozen=True)

    team: str = Field(description="The team ('' for runs without an oppen.team tag).")
    runs: int = Field(description="Runs in the report.")
    cost_micros: Micros = Field(description="What they cost.")
    cost_usd: float = Field(description="What they cost, in dollars.")
    idle_micros: Micros = Field(description="Money spent on idle capacity, over runs that measured their utilisation.")
    idle_usd: float = Field(description="Idle money, in dollars.")
    idle_fraction: float | None = Field(None, description="idle / cost over the runs that measured utilisation.")
    gpu_hours: float = Field(description="GPU-hours requested.")
    cpu_core_hours: float = Field(description="CPU core-hours requested.")


class UtilizationReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    start: datetime = Field(description="First instant covered (UTC, by run start).")
    end: datetime = Field(description="End of the range, excluded (UTC).")
    team: str | None = Field(None, description="The team reported on; None: every team.")
    runs: list[RunUtilization] = Field(description="Finished runs with a settled cost, newest first.")
    truncated: bool = Field(description="True when more runs matched than `limit`: the oldest are left out, of the "
                            "list and of the totals.")
    by_team: list[TeamUtilization] = Field(description="Totals per team over the runs listed, largest cost first.")
    total_cost_micros: Micros = Field(description="Cost of the runs listed.")
    total_cost_usd: float = Field(description="Cost of the runs listed, in dollars.")
    total_idle_micros: Micros = Field(description="Idle money of the runs listed.")
    total_idle_usd: float = Field(description="Idle money, in dollars.")


def get_resource_utilization_report(start: datetime | date | None = None, end: datetime | date | None = None,
                                    team: str | None = None, limit: int = 100) -> UtilizationReport:
    """Per finished training run: measured use against what was requested and paid for, and the idle money.

    From the ledger: each settlement books the run's seconds, resources and measured utilisation beside
    its money, so one query answers for the newest `limit` runs of the range. MLflow is asked only for
    runs settled before the ledger kept those figures (or whose last settlement was an earlier attempt's),
    a hundred runs a request: each run it returns costs it a read of all the run's params, tags and metrics.
    """
    since, until = window(start, end)
    if not isinstance(limit, int) or not 1 <= limit <= MAX_UTILIZATION_RUNS:
        raise InvalidInput(f"limit must be a whole number of runs from 1 to {MAX_UTILIZATION_RUNS}, got {limit!r}")
    if team is not None and not re.fullmatch(NAME_PATTERN, team):
        raise InvalidInput(f"{team!r} is not a team name (lowercase letters, digits, '.', '_' or '-')")
    with context.ledger() as ledger:
        rows = ledger.rows(team=team, since=since, until=until)
    ran = [row for row in reversed(rows) if row["mlflow_run_id"] and row["status"] in LEDGER_RUN_STATUS]  # newest first
    chosen = ran[:limit]
    from_ledger = {row["mlflow_run_id"]: ledger_utilization(row) for row in chosen}
    missing = [run_id for run_id, found in from_ledger.items() if found is None]
    from_mlflow = _mlflow_utilization(missing) if missing else {}
    runs = [found for row in chosen
            if (found := from_ledger[row["mlflow_run_id"]] or from_mlflow.get(row["mlflow_run_id"])) is not None]
    idle = sum(run.idle_micros or 0 for run in runs)
    cost = sum(run.cost_micros for run in runs)
    return UtilizationReport(
        start=since, end=until, team=team, runs=runs, truncated=len(ran) > limit, by_team=_teams(runs),
        total_cost_micros=cost, total_cost_usd=usd_float(cost), total_idle_micros=idle, total_idle_usd=usd_float(idle),
    )


def ledger_utilization(row: Mapping) -> RunUtilization | None:
    """The run's use as its last settlement booked it; None when the ledger cannot say (ask MLflow)."""
    detail = _detail_of(row)
    if "utilization" not in detail or detail.get("attempt") != row.get("attempts"):
        return None
    resources, measured = detail.get("resources") or {}, detail.get("utilization") or {}
    return _utilization(
        mlflow_run_id=row["mlflow_run_id"], flow_run_id=row["run_key"], experiment=row["experiment"], team=row["team"],
        workload=row.get("workload") or "", status=LEDGER_RUN_STATUS[row["status"]],
        started_at=as_utc(row["created_at"]), seconds=float(detail.get("seconds") or 0.0),
        gpus=int(resources.get("gpus") or 0), gpu_type=resources.get("gpu_type"),
        cpu_cores=float(resources.get("cpu_cores") or 1.0), memory_gib=float(resources.get("memory_gib") or 0.0),
        cpu_cores_mean=measured.get(keys.CPU_CORES_MEAN), cpu_cores_peak=measured.get(keys.CPU_CORES_PEAK),
        memory_peak_gib=measured.get(keys.MEMORY_PEAK_GIB), gpu_util_mean=measured.get(keys.GPU_UTIL_MEAN),
        gpu_memory_peak_gib=measured.get(keys.GPU_MEMORY_PEAK_GIB), cost_micros=int(row["spent_micros"]),
    )


def _mlflow_utilization(run_ids: list[str]) -> dict[str, RunUtilization]:
    client = context.mlflow()
    names = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ALL)}
    found = {}
    wanted = sorted({run_id for run_id in run_ids if run_id.isalnum()})  # MLflow ids are hex
    for first in range(0, len(wanted), RUN_ID_CHUNK):
        chunk = wanted[first:first + RUN_ID_CHUNK]
        for run in client.search_runs(list(names), filter_string="attributes.run_id IN ({})".format(
                ", ".join(f"'{run_id}'" for run_id in chunk)), run_view_type=ViewType.ALL, max_results=len(chunk)):
            if keys.COST_TOTAL in run.data.metrics:
                found[run.info.run_id] = run_utilization(run, names.get(run.info.experiment_id, run.info.experiment_id))
    return found


def run_utilization(run, experiment: str) -> RunUtilization:
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    return _utilization(
        mlflow_run_id=run.info.run_id, flow_run_id=tags.get("prefect.flow_run_id"), experiment=experiment,
        team=tags.get("oppen.team"), workload=tags.get("oppen.workload", ""), status=run.info.status,
        started_at=datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc),
        seconds=metrics.get(keys.PEAK_SECONDS, 0.0) + metrics.get(keys.OFF_PEAK_SECONDS, 0.0),
        gpus=int(_param(params, "cost.resources.gpus", float, 0)), gpu_type=_param(params, "cost.resources.gpu_type", str, None),
        cpu_cores=_param(params, "cost.resources.cpu_cores", float, 1.0),
        memory_gib=_param(params, "cost.resources.memory_gib", float, 0.0),
        cpu_cores_mean=metrics.get(keys.CPU_CORES_MEAN), cpu_cores_peak=metrics.get(keys.CPU_CORES_PEAK),
        memory_peak_gib=metrics.get(keys.MEMORY_PEAK_GIB), gpu_util_mean=metrics.get(keys.GPU_UTIL_MEAN),
        gpu_memory_peak_gib=metrics.get(keys.GPU_MEMORY_PEAK_GIB), cost_micros=to_micros(metrics[keys.COST_TOTAL]),
    )


def _utilization(*, gpus: int, cpu_cores: float, cpu_cores_mean: float | None, gpu_util_mean: float | None,
                 cost_micros: int, **figures) -> RunUtilization:
    """The billed device's utilisation and the money idle on it, from what was requested and measured."""
    if gpus:
        device, utilization = "gpu", gpu_util_mean
    else:
        device, utilization = "cpu", (cpu_cores_mean / cpu_cores) if cpu_cores_mean is not None and cpu_cores else None
    utilization = None if utilization is None else min(1.0, max(0.0, utilization))
    idle = None if utilization is None else round(cost_micros * (1 - utilization))
    return RunUtilization(
        gpus=gpus, cpu_cores=cpu_cores, cpu_cores_mean=cpu_cores_mean, gpu_util_mean=gpu_util_mean,
        billed_device=device, utilization=utilization, cost_micros=cost_micros, cost_usd=usd_float(cost_micros),
        idle_micros=idle, idle_usd=None if idle is None else usd_float(idle), **figures,
    )



def _teams(runs: list[RunUtilization]) -> list[TeamUtilization]:
    grouped: dict[str, list[RunUtilization]] = {}
    for run in runs:
        grouped.setdefault(run.team or "", []).append(run)
    totals = []
    for name, members in grouped.items():
        cost = sum(run.cost_micros for run in members)
        measured = [run for run in members if run.idle_micros is not None]
        idle = sum(run.idle_micros for run in measured)
        measured_cost = sum(run.cost_micros for run in measured)
        totals.append(TeamUtilization(
            team=name, runs=len(members), cost_micros=cost, cost_usd=usd_float(cost), idle_micros=idle,
            idle_usd=usd_float(idle), idle_fraction=idle / measured_cost if measured_cost else None,
            gpu_hours=sum(run.gpus * run.seconds for run in members) / 3600,
            cpu_core_hours=sum(run.cpu_cores * run.seconds for run in members) / 3600,
        ))
    return sorted(totals, key=lambda total: -total.cost_micros)


def _param(params: Mapping[str, str], key: str, cast, default):
    """MLflow keeps params as strings; an unset optional field was logged as "None"."""
    value = params.get(key)
    return default if value in (None, "", "None") else cast(value)
