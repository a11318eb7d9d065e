"""calculate_training_cost: a run's money as the ledger booked it and as MLflow recorded it, side by side.

A run is named by its flow run id (the ledger's run key) or its MLflow run id; each leads to the
other through the tag `prefect.flow_run_id` and the ledger's `mlflow_run_id`. The ledger's integer
micro-dollars are the money; MLflow's cost metrics are the same figures as floats plus what explains
them (hours, quote and forecast errors, per-epoch costs). `agrees_with_ledger` checks the two.
"""

from __future__ import annotations

import math
from datetime import datetime

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from oppen import tracking_keys as keys
from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound
from oppen.api.experiments import FLOW_RUN_TAG, metric_group
from oppen.api.moments import as_utc
from oppen.api.recommendations import FLOW_RUN_ID, MLFLOW_RUN_ID, find_run
from oppen.cost.ledger import RUNNING, Ledger
from oppen.cost.ledger_schema import runs
from oppen.cost.money import Micros, format_usd, to_micros, usd_float
from oppen.cost.queue_holds import HELD, QueueHold


class AttemptCost(BaseModel):
    """One attempt of a run (a rescheduled run has several): what it held and what it cost."""

    model_config = ConfigDict(frozen=True)

    number: int = Field(description="1 for the first attempt, n for the n-th (after preemptions).")
    status: str = Field(description="running, settled, stopped (at its cap), failed, preempted, refused, or "
                        "expired (never settled: charged its hold).")
    held_micros: Micros = Field(description="Held against the budgets now (0 once it ended).")
    held_usd: float = Field(description="The same, in dollars.")
    cost_micros: Micros | None = Field(description="What it cost; None while running or when refused.")
    cost_usd: float | None = Field(description="The same, in dollars.")
    started_at: datetime = Field(description="When it reserved (UTC).")
    settled_at: datetime | None = Field(description="When it was settled, refused or expired (UTC).")
    expires_at: datetime = Field(description="When an unsettled hold is charged as spent (UTC).")
    reason: str | None = Field(description="Why it was refused, stopped or failed.")


class MonthCharge(BaseModel):
    """One booked charge: an attempt's cost in one calendar month (UTC)."""

    model_config = ConfigDict(frozen=True)

    attempt: int = Field(description="The attempt it belongs to.")
    month: str = Field(description="YYYY-MM (UTC).")
    kind: str = Field(description="usage (metered) or expiry (the hold of an attempt that never settled).")
    amount_micros: Micros = Field(description="Amount in micro-dollars (exact).")
    amount_usd: float = Field(description="The same, in dollars.")


class EpochCost(BaseModel):
    """The run's cost at the end of one epoch (the meter's cost_epoch_usd)."""

    model_config = ConfigDict(frozen=True)

    epoch: int = Field(description="Epoch number, from 1.")
    step: int = Field(description="The optimizer step the epoch ended at.")
    cumulative_usd: float = Field(description="The run's cost up to the end of this epoch.")
    epoch_usd: float = Field(description="This epoch's part (cumulative minus the previous epoch's).")


class RunCost(BaseModel):
    """A run's cost: the ledger's exact figures, its attempts and charges, and MLflow's cost metrics."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str | None = Field(description="Prefect flow run id (the ledger's run key).")
    mlflow_run_id: str | None = Field(description="MLflow run id; None when the run never reached training.")
    team: str | None = Field(description="The team that pays.")
    experiment: str | None = Field(description="The experiment it is booked to.")
    workload: str | None = Field(description="mnist or lm.")
    status: str = Field(description="The ledger's status: reserved (running), settled, stopped, failed, preempted, "
                        "refused, expired; queued (waiting with a queue hold); unbooked (MLflow knows it, the "
                        "ledger does not).")
    reason: str | None = Field(description="Why it was refused, stopped or failed, as the ledger recorded it.")
    quote_micros: Micros | None = Field(description="The expected cost it was quoted, in micro-dollars.")
    quote_usd: float | None = Field(description="The same, in dollars.")
    cap_micros: Micros | None = Field(description="Its max_cost_usd over all attempts, in micro-dollars.")
    cap_usd: float | None = Field(description="The same, in dollars.")
    spent_micros: Micros = Field(description="Booked charges of all its attempts, in micro-dollars (exact).")
    spent_usd: float = Field(description="The same, in dollars.")
    held_micros: Micros = Field(description="Held now: running attempts, or the queue hold of a queued run.")
    held_usd: float = Field(description="The same, in dollars.")
    attempts: list[AttemptCost] = Field(description="Every attempt, first to last.")
    charges: list[MonthCharge] = Field(description="Every booked charge, by attempt and month.")
    mlflow_cost_usd: float | None = Field(description="MLflow's cost_usd (the run's total at its last settle).")
    mlflow_cost_micros: Micros | None = Field(description="mlflow_cost_usd in micro-dollars.")
    agrees_with_ledger: bool | None = Field(description="mlflow_cost_micros == spent_micros; None when one side has "
                                            "no figure yet.")
    quote_error: float | None = Field(description="(quote - actual) / actual for an uninterrupted run.")
    forecast_after_epoch1_usd: float | None = Field(description="The forecast made after epoch 1.")
    forecast_error: float | None = Field(description="(forecast after epoch 1 - actual) / actual.")
    cost_per_point_usd: float | None = Field(description="Dollars per quality point (accuracy percentage point, or "
                                             "perplexity below the untrained baseline).")
    epoch_costs: list[EpochCost] = Field(description="The cost at each epoch's end.")
    mlflow_metrics: dict[str, float] = Field(description="Every cost figure MLflow holds for the run (cost_*, "
                                             "cost/*: the settlement's figures, resource hours).")
    summary: str = Field(description="One line for a person.")


def calculate_training_cost(run: str) -> RunCost:
    """The cost of a run named by its flow run id (a UUID) or its MLflow run id (32 hex digits)."""
    value = str(run).strip().lower()
    if not (FLOW_RUN_ID.match(value) or MLFLOW_RUN_ID.match(value)):
        raise InvalidInput(f"{run!r} is neither a flow run id (a UUID) nor an MLflow run id (32 hex digits)")
    settings = context.settings()
    client = context.mlflow(settings)
    with context.ledger(settings) as ledger:
        if FLOW_RUN_ID.match(value):
            booked = ledger_run(ledger, run_key=value)
            tracked = mlflow_run_of(client, value, booked["mlflow_run_id"] if booked else None)
            flow_run_id = value
        else:
            tracked = _mlflow_run(client, value)
            flow_run_id = tracked.data.tags.get(FLOW_RUN_TAG) if tracked else None
            booked = ledger_run(ledger, run_key=flow_run_id) if flow_run_id else ledger_run(ledger, mlflow_run_id=value)
            flow_run_id = flow_run_id or (booked["run_key"] if booked else None)
        queued = ledger.queue_hold(flow_run_id) if flow_run_id else None
        attempt_rows = ledger.attempts_of(flow_run_id) if booked else []
        charge_rows = ledger.charges_of(flow_run_id) if booked else []
    if booked is None and tracked is None and queued is None:
        raise NotFound(f"neither the ledger nor MLflow knows run {value}; check the id (a flow run id or an MLflow "
                       "run id) and OPPEN_LEDGER_URL / OPPEN_MLFLOW_TRACKING_URI")
    return run_cost_of(flow_run_id, booked, queued, attempt_rows, charge_rows, tracked,
                 _epoch_history(client, tracked) if tracked else [])


def ledger_run(ledger: Ledger, *, run_key: str | None = None, mlflow_run_id: str | None = None) -> dict | None:
    """The ledger's row of one run, by flow run id or MLflow run id; None when it was never booked."""
    query = select(runs).where(runs.c.run_key == run_key if run_key else runs.c.mlflow_run_id == mlflow_run_id)
    with ledger.engine.connect() as c:
        row = c.execute(query.limit(1)).first()
    return dict(row._mapping) if row else None


def mlflow_run_of(client: MlflowClient, flow_run_id: str, mlflow_run_id: str | None = None) -> Run | None:
    """The MLflow run of a flow run: by the id the ledger (or a flow-run tag) knows, else by its tag."""
    if mlflow_run_id and (run := _mlflow_run(client, mlflow_run_id)) is not None:
        return run
    try:
        return find_run(client, flow_run_id)
    except NotFound:
        return None


def attempt_costs(rows: list[dict]) -> list[AttemptCost]:
    return [
        AttemptCost(
            number=row["number"], status=row["status"],
            held_micros=int(row["held_micros"]) if row["status"] == RUNNING else 0,
            held_usd=usd_float(row["held_micros"]) if row["status"] == RUNNING else 0.0,
            cost_micros=int(row["cost_micros"]) if row["cost_micros"] is not None else None,
            cost_usd=usd_float(row["cost_micros"]) if row["cost_micros"] is not None else None,
            started_at=as_utc(row["started_at"]), settled_at=as_utc(row["settled_at"]) if row["settled_at"] else None,
            expires_at=as_utc(row["expires_at"]), reason=row["reason"],
        )
        for row in rows
    ]


def run_cost_of(flow_run_id: str | None, booked: dict | None, queued: QueueHold | None, attempt_rows: list[dict],
          charge_rows: list[dict], tracked: Run | None, epochs: list[EpochCost]) -> RunCost:
    attempts = attempt_costs(attempt_rows)
    numbers = {row["id"]: row["number"] for row in attempt_rows}
    charges = [MonthCharge(attempt=numbers[row["attempt_id"]], month=row["month"], kind=row["kind"],
                           amount_micros=int(row["amount_micros"]), amount_usd=usd_float(row["amount_micros"]))
               for row in charge_rows]
    spent = int(booked["spent_micros"] or 0) if booked else 0
    waiting = queued is not None and queued.status == HELD
    held = sum(a.held_micros for a in attempts) + (queued.held_micros if waiting else 0)
    quote = booked["quote_micros"] if booked else queued.quote_micros if queued else None
    cap = booked["cap_micros"] if booked else None
    metrics = tracked.data.metrics if tracked else {}
    mlflow_cost = metrics.get(keys.COST_TOTAL)
    mlflow_micros = to_micros(mlflow_cost) if mlflow_cost is not None and math.isfinite(mlflow_cost) else None
    status = booked["status"] if booked else "queued" if waiting else (queued.status if queued else "unbooked")
    tags = tracked.data.tags if tracked else {}
    cost = RunCost(
        flow_run_id=flow_run_id, mlflow_run_id=tracked.info.run_id if tracked else (booked or {}).get("mlflow_run_id"),
        team=booked["team"] if booked else queued.team if queued else tags.get("oppen.team"),
        experiment=booked["experiment"] if booked else queued.experiment if queued else None,
        workload=(booked["workload"] if booked else queued.workload if queued else None) or tags.get("oppen.workload"),
        status=status, reason=booked["reason"] if booked else queued.reason if queued else None,
        quote_micros=quote, quote_usd=usd_float(quote) if quote is not None else None,
        cap_micros=cap, cap_usd=usd_float(cap) if cap is not None else None,
        spent_micros=spent, spent_usd=usd_float(spent), held_micros=held, held_usd=usd_float(held),
        attempts=attempts, charges=charges, mlflow_cost_usd=mlflow_cost, mlflow_cost_micros=mlflow_micros,
        agrees_with_ledger=(mlflow_micros == spent) if booked and mlflow_micros is not None else None,
        quote_error=metrics.get(keys.COST_QUOTE_ERROR), forecast_after_epoch1_usd=metrics.get(keys.COST_FORECAST_EPOCH1),
        forecast_error=metrics.get(keys.COST_FORECAST_ERROR), cost_per_point_usd=metrics.get(keys.COST_PER_POINT),
        epoch_costs=epochs,
        mlflow_metrics={key: value for key, value in sorted(metrics.items()) if metric_group(key) == "cost"},
        summary="",
    )
    return cost.model_copy(update={"summary": describe(cost)})


def describe(cost: RunCost) -> str:
    """`settled: $0.000291 spent of a $0.01 cap (quoted $0.000280), 1 attempt`."""
    parts = [f"{cost.status}: {format_usd(cost.spent_micros)} spent"]
    if cost.cap_micros is not None:
        parts[0] += f" of a {format_usd(cost.cap_micros)} cap"
    if cost.held_micros:
        parts.append(f"{format_usd(cost.held_micros)} held")
    if cost.quote_micros is not None:
        parts.append(f"quoted {format_usd(cost.quote_micros)}")
    if cost.attempts:
        parts.append(f"{len(cost.attempts)} attempt{'s' if len(cost.attempts) != 1 else ''}")
    if cost.agrees_with_ledger is False:
        parts.append(f"MLflow says {format_usd(cost.mlflow_cost_micros)}")
    if cost.reason:
        parts.append(cost.reason)
    return "; ".join(parts)


def _epoch_history(client: MlflowClient, run: Run) -> list[EpochCost]:
    """cost/epoch_usd is each epoch's own cost; cost/accrued_usd at the same step is the run's total by then."""
    if keys.COST_EPOCH not in run.data.metrics:
        return []
    points = sorted(client.get_metric_history(run.info.run_id, keys.COST_EPOCH), key=lambda m: (m.step, m.timestamp))
    accrued = {m.step: m.value for m in client.get_metric_history(run.info.run_id, keys.COST_ACCRUED)}
    steps_per_epoch = int(run.data.params.get(keys.STEPS_PER_EPOCH_PARAM, "0") or 0)
    epochs, cumulative = [], 0.0
    for index, point in enumerate(points, start=1):
        epoch = math.ceil(point.step / steps_per_epoch) if steps_per_epoch else index
        cumulative = accrued.get(point.step, cumulative + point.value)
        epochs.append(EpochCost(epoch=epoch, step=point.step, cumulative_usd=cumulative, epoch_usd=point.value))
    return epochs


def _mlflow_run(client: MlflowClient, run_id: str) -> Run | None:
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
