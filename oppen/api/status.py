"""get_training_status: one flow run as an operator checks on it, queued, running or finished.

    state      Prefect's state of the flow run (type, name, message)
    progress   step and epoch, from the MLflow run's metric history and config (steps per epoch is the
               param `shape.steps_per_epoch`), and the Prefect progress artifact, which moves every
               few seconds where MLflow's step-level points are sparse after the first epoch
    cost       the ledger's attempts (held, spent) and the meter's running total (cost/accrued_usd)
    forecast   the meter's latest forecast of the run's total (cost/forecast_usd) against its cap
    logs       the last lines of the flow run's log, from Prefect's logs API
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import ArtifactSort, LogSort
from pydantic import BaseModel, ConfigDict, Field

from oppen import tracking_keys as keys
from oppen.api import context
from oppen.api.errors import InvalidInput
from oppen.api.experiments import prefect_flow_run_url, run_url
from oppen.api.run_cost import AttemptCost, attempt_costs, ledger_run, mlflow_run_of
from oppen.cost.ledger import RUNNING
from oppen.cost.money import Micros, format_usd, to_micros, usd_float
from oppen.cost.queue_holds import HELD, QueueHold
from oppen.settings import OppenSettings
from tasks.run_events import MLFLOW_TAG_PREFIX

MAX_LOG_LINES = 500
# Metrics logged at the step they describe, sparse enough to read whole: one point per epoch, per
# forecast (a few in the first epoch) or per attempt. The step loss (every log_every_steps) is not read.
STEP_METRICS = (keys.EPOCHS_DONE, keys.COST_ACCRUED, keys.STEPS_COMPLETED)


class RunState(BaseModel):
    """Prefect's state of the flow run."""

    model_config = ConfigDict(frozen=True)

    type: str = Field(description="SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, CRASHED, PAUSED or "
                      "CANCELLING.")
    name: str = Field(description="The state's name: Late, Deferred, OverBudget, InvalidRequest, ... or the type's.")
    message: str | None = Field(description="The state's message (a final run's cost and metric, or why it failed).")
    timestamp: datetime | None = Field(description="When it entered this state (UTC).")
    final: bool = Field(description="True once the run has ended (completed, failed, cancelled or crashed).")


class Progress(BaseModel):
    """How far training got."""

    model_config = ConfigDict(frozen=True)

    step: int = Field(description="Optimizer steps done (0 before training).")
    total_steps: int | None = Field(description="Steps the run will take (epochs x steps per epoch, or max_steps); "
                                    "None before its data was loaded.")
    epoch: float | None = Field(description="Fractional epoch reached: 1.5 = halfway through the second epoch.")
    epochs_completed: int = Field(description="Epochs whose end (validation, checkpoint) has passed.")
    total_epochs: int | None = Field(description="Epochs it will run (fewer than asked when max_steps cuts it).")
    fraction: float | None = Field(description="step / total_steps.")
    train_loss: float | None = Field(description="The latest training loss logged (smoothed over log_every_steps).")
    source: str = Field(description="Where the step came from: mlflow, prefect-artifact, or none (not started).")


class CostSoFar(BaseModel):
    """What the run holds and has spent so far."""

    model_config = ConfigDict(frozen=True)

    spent_micros: Micros = Field(description="Booked by the ledger for its finished attempts, in micro-dollars.")
    spent_usd: float = Field(description="The same, in dollars.")
    held_micros: Micros = Field(description="Held now (the running attempt's hold, or a queued run's queue hold).")
    held_usd: float = Field(description="The same, in dollars.")
    accrued_usd: float | None = Field(description="The meter's running total, earlier attempts included (MLflow "
                                      "cost/accrued_usd; cost/total_usd once settled).")
    accrued_at_step: int | None = Field(description="The step that total was logged at (the meter logs it ten times "
                                        "an epoch and at each epoch's end); None once settled.")
    quote_micros: Micros | None = Field(description="The expected cost it was quoted, in micro-dollars.")
    quote_usd: float | None = Field(description="The same, in dollars.")
    attempts: list[AttemptCost] = Field(description="The ledger's attempts of this run.")


class CostForecast(BaseModel):
    """What the run is expected to cost in all, against its cap."""

    model_config = ConfigDict(frozen=True)

    forecast_usd: float | None = Field(description="The meter's latest forecast of the run's total "
                                       "(cost/forecast_usd).")
    at_step: int | None = Field(description="The step that forecast was made at.")
    cap_micros: Micros | None = Field(description="The run's cap (cost.max_cost_usd), in micro-dollars.")
    cap_usd: float | None = Field(description="The same, in dollars.")
    fraction_of_cap: float | None = Field(description="forecast / cap.")
    quote_p90_usd: float | None = Field(description="The quote's 90th percentile, for comparison.")


class LogLine(BaseModel):
    """One line of the flow run's log."""

    model_config = ConfigDict(frozen=True)

    timestamp: datetime = Field(description="UTC.")
    level: str = Field(description="DEBUG, INFO, WARNING, ERROR or CRITICAL.")
    logger: str = Field(description="The logger (prefect.flow_runs, prefect.task_runs, ...).")
    message: str = Field(description="The line.")


class StatusLinks(BaseModel):
    """Where to look at the run."""

    model_config = ConfigDict(frozen=True)

    prefect: str | None = Field(description="The flow run in the Prefect UI.")
    mlflow: str | None = Field(description="The MLflow run in the MLflow UI (when a UI URL is known).")


class TrainingStatus(BaseModel):
    """A training flow run now: its state, how far it got, what it cost and will cost, and its last log lines."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str = Field(description="Prefect flow run id.")
    flow_run_name: str = Field(description="Prefect's name for it.")
    deployment: str | None = Field(description="flow/deployment it was created from (train-mnist/local).")
    work_queue: str | None = Field(description="The queue it waits or waited in.")
    state: RunState = Field(description="Prefect's state.")
    expected_start_at: datetime | None = Field(description="When it is (or was) due to start (UTC).")
    started_at: datetime | None = Field(description="When it started (UTC); None while queued.")
    ended_at: datetime | None = Field(description="When it ended (UTC); None until final.")
    experiment: str | None = Field(description="The MLflow experiment (and ledger scope).")
    mlflow_run_id: str | None = Field(description="Its MLflow run, once training opened one.")
    progress: Progress = Field(description="Steps and epochs.")
    cost: CostSoFar = Field(description="What it holds and has spent.")
    forecast: CostForecast = Field(description="What it is expected to cost in all, against its cap.")
    logs: list[LogLine] = Field(description="The last lines of its log, oldest first.")
    links: StatusLinks = Field(description="Where to look at it.")
    summary: str = Field(description="One line for a person.")


def get_training_status(flow_run_id: str, log_lines: int = 20) -> TrainingStatus:
    """State, progress, cost so far, forecast and a log tail of one flow run (queued, running or final)."""
    if isinstance(log_lines, bool) or not isinstance(log_lines, int) or not 0 <= log_lines <= MAX_LOG_LINES:
        raise InvalidInput(f"log_lines must be a whole number from 0 to {MAX_LOG_LINES}, got {log_lines!r}")
    settings = context.settings()
    view = _read(settings, flow_run_id, log_lines)
    flow_run, tracked = view.flow_run, view.tracked
    parameters = flow_run.parameters or {}
    run_key = str(flow_run.id)
    status = TrainingStatus(
        flow_run_id=run_key, flow_run_name=flow_run.name, deployment=view.deployment,
        work_queue=flow_run.work_queue_name, state=_state(flow_run), expected_start_at=flow_run.expected_start_time,
        started_at=flow_run.start_time, ended_at=flow_run.end_time if _final(flow_run) else None,
        experiment=(view.booked or {}).get("experiment") or parameters.get("experiment") or view.experiment,
        mlflow_run_id=tracked.info.run_id if tracked else None,
        progress=progress_of(tracked, view.history, parameters, view.percent), cost=_cost_so_far(view),
        forecast=_forecast(tracked, view.history, view.booked, parameters), logs=view.logs,
        links=StatusLinks(prefect=prefect_flow_run_url(run_key), mlflow=_mlflow_url(settings, tracked)),
        summary="",
    )
    return status.model_copy(update={"summary": describe(status)})


@dataclass(frozen=True)
class _View:
    """Everything read for one status: Prefect's flow run, the ledger's rows, the MLflow run."""

    flow_run: FlowRun
    deployment: str | None
    logs: list[LogLine]
    percent: float | None
    booked: dict | None
    attempts: list[AttemptCost]
    queued: QueueHold | None
    tracked: Run | None
    experiment: str | None
    history: dict[str, list[Metric]]


def _read(settings: OppenSettings, flow_run_id: str, log_lines: int) -> _View:
    with context.prefect() as prefect, ThreadPoolExecutor(max_workers=3) as pool:
        flow_run = context.read_flow_run(prefect, flow_run_id)
        # Independent reads side by side: each waits on a server, and a status is asked for in a loop.
        deployment = pool.submit(_deployment_name, prefect, flow_run)
        logs = pool.submit(_log_tail, prefect, flow_run, log_lines)
        percent = pool.submit(_progress_percent, prefect, flow_run)
        run_key = str(flow_run.id)
        with context.ledger(settings) as ledger:
            booked = ledger_run(ledger, run_key=run_key)
            attempts = attempt_costs(ledger.attempts_of(run_key)) if booked else []
            queued = ledger.queue_hold(run_key)
        client = context.mlflow(settings)
        tracked = _tracked_run(client, flow_run, booked)
        experiment = client.get_experiment(tracked.info.experiment_id).name if tracked and not booked else None
        return _View(flow_run, deployment.result(), logs.result(), percent.result(), booked, attempts, queued, tracked,
                     experiment, _step_history(client, tracked))


def _final(flow_run: FlowRun) -> bool:
    return bool(flow_run.state and flow_run.state.is_final())


def _mlflow_url(settings: OppenSettings, run: Run | None) -> str | None:
    return run_url(settings, run.info.experiment_id, run.info.run_id) if run else None


def _state(flow_run: FlowRun) -> RunState:
    state = flow_run.state
    if state is None:
        return RunState(type="UNKNOWN", name="Unknown", message=None, timestamp=None, final=False)
    return RunState(type=state.type.value, name=state.name, message=state.message or None, timestamp=state.timestamp,
                    final=state.is_final())


def _cost_so_far(view: _View) -> CostSoFar:
    booked, queued = view.booked, view.queued
    spent = int(booked["spent_micros"] or 0) if booked else 0
    held = sum(a.held_micros for a in view.attempts) + (queued.held_micros if queued and queued.status == HELD else 0)
    quote = booked["quote_micros"] if booked else queued.quote_micros if queued else None
    metrics = view.tracked.data.metrics if view.tracked else {}
    # cost/total_usd is the run's total at its last settle; while an attempt runs (a resumed run's second, say),
    # the meter's running total is the newer figure.
    settled = keys.COST_TOTAL in metrics and not any(attempt.status == RUNNING for attempt in view.attempts)
    return CostSoFar(
        spent_micros=spent, spent_usd=usd_float(spent), held_micros=held, held_usd=usd_float(held),
        accrued_usd=metrics[keys.COST_TOTAL] if settled else metrics.get(keys.COST_ACCRUED),
        accrued_at_step=None if settled else _last_step(view.history.get(keys.COST_ACCRUED)),
        quote_micros=quote, quote_usd=usd_float(quote) if quote is not None else None, attempts=view.attempts,
    )


def describe(status: TrainingStatus) -> str:
    """`Running; step 520/600 (epoch 2/2); $0.006870 at step 429, $0.00 spent, $0.011827 held; forecast ...`."""
    parts = [status.state.name]
    progress = status.progress
    if progress.source != "none":
        total = f"/{progress.total_steps}" if progress.total_steps else ""
        epochs = ""
        if progress.epoch is not None and progress.total_epochs:
            epochs = f" (epoch {min(progress.total_epochs, max(1, math.ceil(progress.epoch)))}/{progress.total_epochs})"
        parts.append(f"step {progress.step}{total}{epochs}")
    money = f"{format_usd(status.cost.spent_micros)} spent"
    if status.cost.held_micros:
        money += f", {format_usd(status.cost.held_micros)} held"
    if not status.state.final and status.cost.accrued_usd is not None:
        at = f" at step {status.cost.accrued_at_step}" if status.cost.accrued_at_step is not None else ""
        money = f"${status.cost.accrued_usd:.6f}{at}, {money}"
    parts.append(money)
    forecast = status.forecast
    if not status.state.final and forecast.forecast_usd is not None:
        cap = f" of a {format_usd(forecast.cap_micros)} cap" if forecast.cap_micros is not None else ""
        parts.append(f"forecast ${forecast.forecast_usd:.6f}{cap}")
    return "; ".join(parts)


def _deployment_name(client: SyncPrefectClient, flow_run: FlowRun) -> str | None:
    if flow_run.deployment_id is None:
        return None
    deployment = client.read_deployment(flow_run.deployment_id)
    flow = client.read_flow(flow_run.flow_id)
    return f"{flow.name}/{deployment.name}"


def _log_tail(client: SyncPrefectClient, flow_run: FlowRun, lines: int) -> list[LogLine]:
    if not lines:
        return []
    found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=lines,
                             sort=LogSort.TIMESTAMP_DESC)
    return [LogLine(timestamp=log.timestamp, level=logging.getLevelName(log.level), logger=log.name,
                    message=log.message) for log in reversed(found)]


def _progress_percent(client: SyncPrefectClient, flow_run: FlowRun) -> float | None:
    """The training task's progress artifact (tasks/progress.py): the latest attempt's, in percent."""
    found = client.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
                                       type=ArtifactFilterType(any_=["progress"])),
        sort=ArtifactSort.UPDATED_DESC, limit=1)
    if not found or not isinstance(found[0].data, (int, float)):
        return None
    return float(found[0].data)


def _tracked_run(client: MlflowClient, flow_run: FlowRun, booked: dict | None) -> Run | None:
    """Its MLflow run: named by the flow run's `mlflow:<experiment>/<run>` tag, the ledger, or found by its tag."""
    tagged = next((tag.removeprefix(MLFLOW_TAG_PREFIX).rpartition("/")[2] for tag in flow_run.tags or []
                   if tag.startswith(MLFLOW_TAG_PREFIX)), None)
    known = tagged or (booked or {}).get("mlflow_run_id")
    if known is None and flow_run.start_time is None:
        return None  # still queued: nothing has opened an MLflow run, so there is nothing to search for
    return mlflow_run_of(client, str(flow_run.id), known)


def _step_history(client: MlflowClient, run: Run | None) -> dict[str, list[Metric]]:
    if run is None:
        return {}
    return {key: client.get_metric_history(run.info.run_id, key) for key in STEP_METRICS if key in run.data.metrics}


def _last_step(points: list[Metric] | None) -> int | None:
    return max(point.step for point in points) if points else None


def progress_of(run: Run | None, history: dict[str, list[Metric]], parameters: dict[str, Any],
              percent: float | None) -> Progress:
    asked = parameters.get("run") or {}
    params = run.data.params if run else {}
    epochs = _int(params.get("run.epochs")) or _int(asked.get("epochs"))
    max_steps = _int(params.get("run.max_steps")) or _int(asked.get("max_steps"))
    metrics = run.data.metrics if run else {}
    steps_per_epoch = _int(params.get(keys.STEPS_PER_EPOCH_PARAM))
    total_steps = None
    if steps_per_epoch and epochs:
        total_steps = min(epochs * steps_per_epoch, max_steps) if max_steps else epochs * steps_per_epoch
    step, source = 0, "none"
    logged = [_last_step(points) for points in history.values() if points]
    if logged:
        step, source = max(logged), "mlflow"
    if percent is not None and total_steps:
        from_artifact = round(percent * total_steps / 100)
        if from_artifact > step:
            step, source = from_artifact, "prefect-artifact"
    return Progress(
        step=step, total_steps=total_steps, epoch=step / steps_per_epoch if steps_per_epoch else None,
        epochs_completed=int(metrics.get(keys.EPOCHS_DONE, 0)),
        total_epochs=math.ceil(total_steps / steps_per_epoch) if total_steps and steps_per_epoch else epochs,
        fraction=min(1.0, step / total_steps) if total_steps else None,
        train_loss=metrics.get(keys.TRAIN_LOSS, metrics.get(keys.TRAIN_EPOCH_LOSS)), source=source,
    )


def _forecast(run: Run | None, history: dict[str, list[Metric]], booked: dict | None,
              parameters: dict[str, Any]) -> CostForecast:
    cap = booked["cap_micros"] if booked else None
    asked_cap = (parameters.get("cost") or {}).get("max_cost_usd")
    if cap is None and isinstance(asked_cap, (int, float)) and not isinstance(asked_cap, bool):
        cap = to_micros(asked_cap, ceiling=True)  # a queued run's cap, as the ledger will record it
    metrics = run.data.metrics if run else {}
    forecast = metrics.get(keys.COST_FORECAST)
    # The meter logs each forecast with the running total, at the same step.
    at_step = _last_step(history.get(keys.COST_ACCRUED)) if forecast is not None else None
    return CostForecast(
        forecast_usd=forecast, at_step=at_step, cap_micros=cap, cap_usd=usd_float(cap) if cap is not None else None,
        fraction_of_cap=forecast / usd_float(cap) if forecast is not None and cap else None,
        quote_p90_usd=_float(run.data.params.get(keys.QUOTE_P90_PARAM)) if run else None,
    )


def _float(value: Any) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    """MLflow params are strings ("None" for an unset optional); metrics are floats."""
    try:
        return int(float(value)) if value not in (None, "", "None") else None
    except (TypeError, ValueError):
        return None
