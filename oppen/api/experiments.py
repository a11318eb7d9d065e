"""list_experiments and get_experiment_metrics: what MLflow knows of experiments and runs, with the ledger's money.

Listing stays fast with thousands of runs: MLflow is asked two `max_results=1` questions per
experiment (its latest run, and its best by the quality metric, both ordered in the store) and the
ledger one aggregate for all the listed experiments. MLflow has no cheap way to count runs, so the
run counts are the ledger's: every training run an Oppen flow started, refused ones included.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities import Experiment, Run, ViewType
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import case, func, select

from oppen import tracking_keys as keys
from oppen.api import context
from oppen.api.errors import InvalidInput
from oppen.api.moments import as_utc
from oppen.api.recommendations import find_run
from oppen.api.registry import ModelVersionInfo, versions_of_run
from oppen.cost.ledger import REFUSED, RESERVED, RUNNING, Ledger
from oppen.cost.ledger_schema import attempts, queue_holds, runs
from oppen.cost.money import Micros, usd_float
from oppen.cost.queue_holds import HELD
from oppen.links import mlflow_experiment_url, mlflow_run_url, prefect_flow_run_url  # noqa: F401 (re-exported)
from oppen.settings import OppenSettings
from tasks.run_records import TEST_METRICS
from tasks.tracking import client_for

MAX_EXPERIMENTS = 1000
LOOKUP_THREADS = 8  # per-experiment MLflow questions run side by side: each waits on the store, not the CPU
FLOW_RUN_TAG = "prefect.flow_run_id"
TAG_PREFIXES = ("oppen.", "prefect.")  # the tags that say who a run is; mlflow.* tags are MLflow's bookkeeping
# MLflow sections (oppen/tracking_keys.py) → the groups a run's metrics are reported in.
SECTION_GROUPS = {"cost": "cost", "speed": "cost", "train": "train", "val": "validation", "test": "test", "eval": "test",
                  "utilization": "system", "system": "system"}


# --- list_experiments -----------------------------------------------------------------------


class ExperimentSummary(BaseModel):
    """One MLflow experiment: its runs, its best result, and what the ledger booked for it."""

    model_config = ConfigDict(frozen=True)

    experiment_id: str = Field(description="MLflow experiment id.")
    name: str = Field(description="Experiment name (also the ledger's experiment scope).")
    runs: int = Field(description="Training runs the ledger booked for it (refused ones included); runs made "
                      "outside Oppen's flows are in MLflow only and not counted.")
    running: int = Field(description="Of those, runs holding money now (training).")
    refused: int = Field(description="Of those, runs refused by a budget or their cap before training.")
    queued: int = Field(description="Runs waiting in a queue with a hold on this experiment's budgets.")
    last_run_at: datetime | None = Field(description="When its latest run started (UTC); None: no runs.")
    workload: str | None = Field(description="The workload of its latest run (mnist, lm), from the run's tags.")
    quality_metric: str | None = Field(description="The metric runs are compared by: test_accuracy (mnist, higher "
                                       "is better) or eval_perplexity (lm, lower is better).")
    higher_is_better: bool | None = Field(description="Direction of the quality metric.")
    best_value: float | None = Field(description="The best value of the quality metric over its runs.")
    best_run_id: str | None = Field(description="The MLflow run that scored it.")
    spent_micros: Micros = Field(description="Charges the ledger booked to its runs, in micro-dollars (exact).")
    spent_usd: float = Field(description="The same, in dollars.")
    held_micros: Micros = Field(description="Held now by its running and queued runs, in micro-dollars.")
    held_usd: float = Field(description="The same, in dollars.")
    mlflow_url: str | None = Field(description="The experiment's page in the MLflow UI, when a UI URL is known.")


@dataclass(frozen=True)
class _Booked:
    runs: int = 0
    running: int = 0
    refused: int = 0
    queued: int = 0
    spent: Micros = 0
    held: Micros = 0
    last_created: datetime | None = None


@dataclass(frozen=True)
class _Tracked:
    last_run: Run | None
    best_run: Run | None
    metric: str | None
    higher_is_better: bool | None


def list_experiments(name_contains: str | None = None, max_results: int = 100) -> list[ExperimentSummary]:
    """Active MLflow experiments (optionally those whose name contains `name_contains`), latest run first."""
    if isinstance(max_results, bool) or not isinstance(max_results, int) or not 1 <= max_results <= MAX_EXPERIMENTS:
        raise InvalidInput(f"max_results must be a whole number from 1 to {MAX_EXPERIMENTS}, got {max_results!r}")
    settings = context.settings()
    client = context.mlflow(settings)
    experiments = _experiments(client, name_contains, max_results)
    if not experiments:
        return []
    with ThreadPoolExecutor(max_workers=min(LOOKUP_THREADS, len(experiments) + 1)) as pool:
        ledger_side = pool.submit(_booked, settings, [experiment.name for experiment in experiments])
        tracked = list(pool.map(lambda experiment: _tracked(client, experiment.experiment_id), experiments))
        booked = ledger_side.result()
    summaries = [_summary(e, t, booked.get(e.name, _Booked()), settings) for e, t in zip(experiments, tracked)]
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    by_name = sorted(summaries, key=lambda s: s.name)
    return sorted(by_name, key=lambda s: s.last_run_at or oldest, reverse=True)  # stable: ties stay by name


def _experiments(client: MlflowClient, name_contains: str | None, limit: int) -> list[Experiment]:
    """Filtered here, not in an MLflow filter string: a name may hold quotes or % that would need escaping."""
    needle = (name_contains or "").strip().lower()
    found, token = [], None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=MAX_EXPERIMENTS,
                                         order_by=["last_update_time DESC"], page_token=token)
        found.extend(e for e in page if needle in e.name.lower())
        token = page.token
        if not token or len(found) >= limit:
            return found[:limit]


def _tracked(client: MlflowClient, experiment_id: str) -> _Tracked:
    latest = client.search_runs([experiment_id], max_results=1, order_by=["attributes.start_time DESC"])
    if not latest:
        return _Tracked(None, None, None, None)
    metric, higher = quality_metric_of(latest[0])
    if metric is None:
        return _Tracked(latest[0], None, None, None)
    # Runs without the metric sort last in either direction, so the first run is the best one that has it.
    key = keys.metric_key(metric)
    best = client.search_runs([experiment_id], max_results=1,
                              order_by=[f"metrics.`{key}` {'DESC' if higher else 'ASC'}"])
    best_run = best[0] if best and key in best[0].data.metrics else None
    return _Tracked(latest[0], best_run, metric, higher)


def quality_metric_of(run: Run) -> tuple[str | None, bool | None]:
    """The metric the flows judge a run by, from its workload tag (else from the metrics it logged)."""
    workload = run.data.tags.get("oppen.workload")
    if workload in TEST_METRICS:
        return TEST_METRICS[workload]
    for metric, higher in TEST_METRICS.values():
        if keys.metric_key(metric) in run.data.metrics:
            return metric, higher
    return None, None


def _booked(settings: OppenSettings, names: list[str]) -> dict[str, _Booked]:
    with context.ledger(settings) as ledger:
        return booked_per_experiment(ledger, names)


def booked_per_experiment(ledger: Ledger, names: Iterable[str]) -> dict[str, _Booked]:
    """The ledger's figures for each experiment, in two aggregate statements however many runs there are."""
    names = list(names)
    running_holds = (select(attempts.c.run_id, func.sum(attempts.c.held_micros).label("held"))
                     .where(attempts.c.status == RUNNING).group_by(attempts.c.run_id).subquery())
    per_run = (
        select(runs.c.experiment, func.count().label("runs"),
               func.sum(case((runs.c.status == RESERVED, 1), else_=0)).label("running"),
               func.sum(case((runs.c.status == REFUSED, 1), else_=0)).label("refused"),
               func.coalesce(func.sum(runs.c.spent_micros), 0).label("spent"),
               func.coalesce(func.sum(running_holds.c.held), 0).label("held"),
               func.max(runs.c.created_at).label("last_created"))
        .outerjoin(running_holds, running_holds.c.run_id == runs.c.id)
        .where(runs.c.experiment.in_(names)).group_by(runs.c.experiment)
    )
    waiting = (select(queue_holds.c.experiment, func.count().label("queued"),
                      func.coalesce(func.sum(queue_holds.c.held_micros), 0).label("held"))
               .where(queue_holds.c.status == HELD, queue_holds.c.experiment.in_(names))
               .group_by(queue_holds.c.experiment))
    with ledger.engine.connect() as c:
        booked = {row.experiment: row for row in c.execute(per_run)}
        queued = {row.experiment: row for row in c.execute(waiting)}
    result = {}
    for name in set(booked) | set(queued):
        row, wait = booked.get(name), queued.get(name)
        result[name] = _Booked(
            runs=int(row.runs) if row else 0, running=int(row.running or 0) if row else 0,
            refused=int(row.refused or 0) if row else 0, queued=int(wait.queued) if wait else 0,
            spent=int(row.spent) if row else 0,  # PostgreSQL sums BIGINT as NUMERIC
            held=(int(row.held) if row else 0) + (int(wait.held) if wait else 0),
            last_created=as_utc(row.last_created) if row else None,
        )
    return result


def _summary(experiment: Experiment, tracked: _Tracked, booked: _Booked, settings: OppenSettings) -> ExperimentSummary:
    started = run_start(tracked.last_run) if tracked.last_run else None
    last = max((moment for moment in (started, booked.last_created) if moment is not None), default=None)
    best = tracked.best_run
    return ExperimentSummary(
        experiment_id=experiment.experiment_id, name=experiment.name, runs=booked.runs, running=booked.running,
        refused=booked.refused, queued=booked.queued, last_run_at=last,
        workload=tracked.last_run.data.tags.get("oppen.workload") if tracked.last_run else None,
        quality_metric=tracked.metric, higher_is_better=tracked.higher_is_better,
        best_value=best.data.metrics[keys.metric_key(tracked.metric)] if best else None, best_run_id=best.info.run_id if best else None,
        spent_micros=booked.spent, spent_usd=usd_float(booked.spent), held_micros=booked.held,
        held_usd=usd_float(booked.held), mlflow_url=experiment_url(settings, experiment.experiment_id),
    )


# --- get_experiment_metrics -----------------------------------------------------------------


class MetricGroups(BaseModel):
    """A run's latest metric values, grouped by what they measure."""

    model_config = ConfigDict(frozen=True)

    cost: dict[str, float] = Field(description="cost/* and speed/*: the cost engine's figures and measured speed.")
    train: dict[str, float] = Field(description="train/*: loss, epochs, steps and throughput of the training loop.")
    validation: dict[str, float] = Field(description="val/*: measured on the validation split after each epoch.")
    test: dict[str, float] = Field(description="test/* and eval/*: the final evaluation on held-out data.")
    system: dict[str, float] = Field(description="utilization/* and system/*: CPU, memory and GPU use.")
    other: dict[str, float] = Field(description="Anything else the run logged.")


class RunLinks(BaseModel):
    """Where to look at a run."""

    model_config = ConfigDict(frozen=True)

    mlflow: str | None = Field(description="The run's page in the MLflow UI (when a UI URL is known).")
    prefect: str | None = Field(description="The flow run's page in the Prefect UI (when the run has a flow run).")


class RunMetrics(BaseModel):
    """One MLflow run: how it went, what it logged, what it was registered as, and where to look."""

    model_config = ConfigDict(frozen=True)

    run_id: str = Field(description="MLflow run id.")
    run_name: str | None = Field(description="MLflow run name (the flow run's name for Oppen runs).")
    experiment_id: str = Field(description="MLflow experiment id.")
    experiment: str | None = Field(description="MLflow experiment name.")
    status: str = Field(description="RUNNING, FINISHED, FAILED or KILLED (KILLED: preempted, resumed by the next "
                        "attempt).")
    started_at: datetime | None = Field(description="Start (UTC).")
    ended_at: datetime | None = Field(description="End (UTC); None while running.")
    duration_seconds: float | None = Field(description="End minus start; None while running.")
    flow_run_id: str | None = Field(description="The Prefect flow run that trained it (tag prefect.flow_run_id).")
    workload: str | None = Field(description="mnist or lm (tag oppen.workload).")
    team: str | None = Field(description="The team that paid (tag oppen.team).")
    attempt: int | None = Field(description="How many attempts the flow run made (more than 1 after a preemption).")
    params: dict[str, str] = Field(description="The run's config, flattened (run.epochs, cost.resources.gpus, ...).")
    metrics: MetricGroups = Field(description="Latest value of every metric, grouped.")
    tags: dict[str, str] = Field(description="The oppen.* and prefect.* tags.")
    model_versions: list[ModelVersionInfo] = Field(description="Registered model versions made from this run.")
    links: RunLinks = Field(description="Where to look at it in the UIs.")


def get_experiment_metrics(run_id: str) -> RunMetrics:
    """An MLflow run (by its id, or by the flow run id it is tagged with): status, params, metrics, versions, links."""
    settings = context.settings()
    client = client_for(settings)
    run = find_run(client, run_id)
    info, data = run.info, run.data
    experiment = client.get_experiment(info.experiment_id)
    started = run_start(run)
    ended = datetime.fromtimestamp(info.end_time / 1000, tz=timezone.utc) if info.end_time else None
    flow_run_id = data.tags.get(FLOW_RUN_TAG)
    attempt = data.tags.get("oppen.attempt")
    return RunMetrics(
        run_id=info.run_id, run_name=info.run_name or None, experiment_id=info.experiment_id,
        experiment=experiment.name if experiment else None, status=info.status, started_at=started, ended_at=ended,
        duration_seconds=(ended - started).total_seconds() if started and ended else None,
        flow_run_id=flow_run_id, workload=data.tags.get("oppen.workload"), team=data.tags.get("oppen.team"),
        attempt=int(attempt) if attempt and attempt.isdigit() else None, params=dict(sorted(data.params.items())),
        metrics=group_metrics(data.metrics),
        tags={key: value for key, value in sorted(data.tags.items()) if key.startswith(TAG_PREFIXES)},
        model_versions=versions_of_run(client, info.run_id, settings),
        links=RunLinks(mlflow=run_url(settings, info.experiment_id, info.run_id),
                       prefect=prefect_flow_run_url(flow_run_id)),
    )


def metric_group(key: str) -> str:
    """The group of a key by its MLflow section (cost/total_usd → cost, val/accuracy → validation)."""
    return SECTION_GROUPS.get(keys.section_of(key), "other")


def group_metrics(metrics: dict[str, float]) -> MetricGroups:
    groups: dict[str, dict[str, float]] = {name: {} for name in MetricGroups.model_fields}
    for key, value in sorted(metrics.items()):
        groups[metric_group(key)][key] = value
    return MetricGroups(**groups)


# --- shared with status and cost ---------------------------------------------------------------


def run_start(run: Run) -> datetime | None:
    return datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc) if run.info.start_time else None


def experiment_url(settings: OppenSettings, experiment_id: str) -> str | None:
    return mlflow_experiment_url(settings.ui_url, experiment_id)


def run_url(settings: OppenSettings, experiment_id: str, run_id: str) -> str | None:
    """The URL the training flow logs for its run (tasks.mlflow_tasks.open_tracking_run)."""
    return mlflow_run_url(settings.ui_url, experiment_id, run_id)
