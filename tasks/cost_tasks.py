"""Prefect tasks of the cost engine: thin wrappers that call oppen.cost and record what it decided."""

from __future__ import annotations

import time
from datetime import timedelta

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.events import emit_event
from prefect.runtime import flow_run

from oppen.cost.budgets import open_ledger
from oppen.cost.ledger import Reservation, UnknownTeamError, month_of, utcnow
from oppen.cost.meter import CostEvent, CostMeter
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import PriceBook, Resources
from oppen.cost.quote import Quote, make_quote
from oppen.cost.settlement import RunCost, render_cost_markdown
from oppen.cost.speed import RunShape, from_calibration, from_history
from oppen.settings import OppenSettings
from tasks.cost_history import SPEED_KEY_TAG, past_runs, speed_key
from tasks.tracking import client_for, log_metrics
from training.calibrate import calibrate
from training.config import RunConfig
from training.loop import plan_total_steps
from training.runtime import select_device
from training.workload import Workload

TAIL_LOGGING_SECONDS = 2.0  # measured: logging a small model to a local MLflow store takes ~1.5-2.5 s


class BudgetRefused(RuntimeError):
    """The run's quote does not fit its team's or experiment's budget; nothing was trained."""


class ResourceRequestError(ValueError):
    """The request asks for what this pool cannot give (e.g. more GPUs than the machine has)."""


def _emit(name: str, team: str, payload: dict) -> None:
    run_id = flow_run.get_id() or "adhoc"
    emit_event(
        event=name,
        resource={"prefect.resource.id": f"oppen.flow-run.{run_id}", "oppen.team": team},
        related=[{"prefect.resource.id": f"prefect.flow-run.{run_id}", "prefect.resource.role": "flow-run"}]
        if flow_run.get_id() else None,
        payload=payload,
    )


def check_local_resources(resources: Resources, run: RunConfig) -> None:
    """On the process pool the request must fit this machine, or the bill would be for GPUs never used."""
    import torch

    available = torch.cuda.device_count()
    if resources.gpus > available:
        raise ResourceRequestError(
            f"the run asks for {resources.gpus} GPU(s) but this machine has {available}; "
            "use the kubernetes-gpu pool or lower cost.resources.gpus"
        )
    if resources.gpus == 0 and run.device.startswith("cuda"):
        raise ResourceRequestError("run.device asks for CUDA but cost.resources.gpus is 0: the GPU would go unbilled")


@task(cache_policy=NONE)
def precheck_budget(settings: OppenSettings, policy: CostPolicy, experiment: str) -> None:
    """Unknown team or an exhausted budget: refuse before even the data is read."""
    ledger = open_ledger(settings.ledger, settings.budgets_file)
    try:
        if policy.team not in ledger.team_names():
            raise UnknownTeamError(
                f"unknown team {policy.team!r} (known: {', '.join(ledger.team_names())}); "
                "add it to the budgets file and run `oppen budgets apply`"
            )
        for budget in ledger.budgets_of(policy.team):
            if budget["experiment"] not in ("", experiment):
                continue
            month = month_of(utcnow()) if budget["period"] == "monthly" else None
            used = ledger.used_usd(policy.team, budget["experiment"] or None, month)
            if used >= budget["amount_usd"]:
                scope = f"{policy.team}/{budget['experiment']}" if budget["experiment"] else policy.team
                raise BudgetRefused(f"budget of {scope} is exhausted: ${used:,.4f} of ${budget['amount_usd']:,.4f} used")
    finally:
        ledger.dispose()


@task(cache_policy=NONE)
def quote_run(
    settings: OppenSettings, book: PriceBook, workload: Workload, run: RunConfig, policy: CostPolicy,
    fixed_overhead_seconds: float, mlflow_run_id: str,
) -> tuple[Quote, str]:
    """Expected cost and p90 from this config's speed history in MLflow, else from a short calibration."""
    logger = get_run_logger()
    device = str(select_device(run.device))
    key = speed_key(workload.name, workload.config_dict(), run, policy.resources, device)
    client = client_for(settings)
    client.set_tag(mlflow_run_id, SPEED_KEY_TAG, key)
    speed = from_history(past_runs(client, key))
    if speed is None:
        started = time.perf_counter()
        measured = calibrate(workload, run, policy.calibration_steps)
        spent = time.perf_counter() - started
        # Fixed time = loading + this calibration (both already billed). The tail after training (the
        # test pass, ~2 validation passes, and model logging) is estimated until history replaces it.
        tail = 2 * measured.eval_seconds + TAIL_LOGGING_SECONDS
        speed = from_calibration(measured.step_seconds, run.batch_size, measured.eval_seconds,
                                 fixed_overhead_seconds + spent, tail)
        logger.info("no speed history for %s: calibrated %d steps in %.1fs", key, len(measured.step_seconds), spent)
    shape = RunShape(
        total_steps=plan_total_steps(workload, run), steps_per_epoch=workload.steps_per_epoch(run.batch_size),
        batch_size=run.batch_size,
    )
    checkpoint_interval = None
    if run.checkpoint_every_steps:
        checkpoint_interval = run.checkpoint_every_steps * run.batch_size * speed.seconds_per_sample
    quote = make_quote(
        book, policy.resources, speed, shape, utcnow(), spot=policy.spot,
        spot_rate_per_hour=policy.spot_interruptions_per_hour, checkpoint_interval_s=checkpoint_interval,
    )
    log_metrics(client, mlflow_run_id, {
        "quote_expected_usd": quote.expected_usd, "quote_p90_usd": quote.p90_usd,
        "quote_expected_seconds": quote.expected_seconds, "quote_cost_per_epoch_usd": quote.cost_per_epoch_usd,
        "quote_cheapest_usd": quote.cheapest_usd,
    }, 0)
    client.set_tag(mlflow_run_id, "oppen.quote", quote.summary())
    logger.info("quote: %s", quote.summary())
    return quote, key


@task(cache_policy=NONE)
def reserve_budget(
    settings: OppenSettings, policy: CostPolicy, experiment: str, workload_name: str, quote: Quote,
    mlflow_run_id: str,
) -> Reservation:
    """Hold the p90 quote (or the cap, when smaller) against the team and experiment budgets, atomically."""
    logger = get_run_logger()
    amount = min(quote.p90_usd, policy.max_cost_usd) if policy.max_cost_usd else quote.p90_usd
    ledger = open_ledger(settings.ledger, settings.budgets_file)
    try:
        reservation = ledger.reserve(
            team=policy.team, experiment=experiment, run_key=str(flow_run.get_id() or mlflow_run_id),
            quote_usd=quote.expected_usd, reserve_usd=amount,
            # A run that dies without settling releases its hold after this (charged what it held).
            hold_for=timedelta(seconds=3 * quote.p90_seconds + 3600),
            workload=workload_name, mlflow_run_id=mlflow_run_id,
        )
    finally:
        ledger.dispose()
    if not reservation.accepted:
        logger.error("refused: %s", reservation.reason)
        _emit("oppen.budget.refused", policy.team, {"reason": reservation.reason, "quote_usd": quote.expected_usd,
                                                     "experiment": experiment})
        raise BudgetRefused(f"refused before training: {reservation.reason}")
    for use in reservation.warnings(policy.warn_fraction):
        logger.warning("budget warning: %s", use.describe())
        _emit("oppen.budget.warning", policy.team, {
            "scope": use.scope, "amount_usd": use.amount_usd, "used_usd": use.used_usd,
            "request_usd": use.request_usd, "fraction": use.fraction_after, "experiment": experiment,
        })
    logger.info("reserved $%.6f for this run (reservation %s%s)", reservation.reserved_usd, reservation.id,
                ", resumed" if reservation.reused else "")
    return reservation


class PrefectCostReporter:
    """Where the meter's forecasts and threshold events go: MLflow metrics, log lines and Prefect events."""

    def __init__(self, settings: OppenSettings, mlflow_run_id: str, team: str) -> None:
        self.client = client_for(settings)
        self.run_id = mlflow_run_id
        self.team = team
        self.logger = get_run_logger()

    def forecast(self, point) -> None:
        log_metrics(self.client, self.run_id, {"cost_forecast_usd": point.forecast_usd,
                                               "cost_accrued_usd": point.accrued_usd}, point.step)
        if point.basis == "epochs":
            # The cumulative cost at each epoch's end: the early-stopping recommender prices epochs with it.
            log_metrics(self.client, self.run_id, {"cost_epoch_usd": point.accrued_usd}, point.step)
            self.logger.info("cost so far $%.6f; forecast total $%.6f (after epoch %.0f)",
                             point.accrued_usd, point.forecast_usd, point.epoch)

    def event(self, event: CostEvent) -> None:
        if event.name == "oppen.cost.threshold":
            self.logger.warning("cost reached %.0f%% of its %s ($%.6f of $%.6f)", event.payload["fraction"] * 100,
                                event.payload["of"], event.payload["accrued_usd"], event.payload["of_usd"])
        else:
            self.logger.warning("%s: %s", event.name, event.payload)
        _emit(event.name, self.team, event.payload)


def make_meter(
    book: PriceBook, policy: CostPolicy, quote: Quote, reservation: Reservation, reporter: PrefectCostReporter,
    started_at,
) -> CostMeter:
    """The run's cap is the tighter of its own max_cost_usd and what its budgets had left.

    Training stops early enough to leave the expected tail (test pass, model logging) inside the cap.
    """
    caps = [value for value in (policy.max_cost_usd, reservation.headroom_usd) if value is not None]
    return CostMeter(
        book, policy.resources, spot=policy.spot, cap_usd=min(caps) if caps else None,
        threshold_base_usd=reservation.reserved_usd or None,
        expected_step_seconds=quote.speed.seconds_per_sample * quote.shape.batch_size,
        expected_epoch_overhead_seconds=quote.speed.epoch_overhead_seconds,
        # The tail varies by seconds from run to run (model logging, registry writes); a cap is a
        # ceiling, so keep back 1.5x the estimate plus a second rather than the median alone.
        tail_reserve_seconds=1.5 * quote.speed.tail_seconds + 1.0,
        on_event=reporter.event, on_forecast=reporter.forecast, started_at=started_at,
    )


@task(cache_policy=NONE, retries=3, retry_delay_seconds=[1, 3, 10])
def settle_run(
    settings: OppenSettings, reservation: Reservation, cost: RunCost, mlflow_run_id: str, title: str,
    speed_metrics: dict[str, float] | None = None,
) -> RunCost:
    """Ledger, MLflow and the cost artifact get the same figures (retried: the ledger must not miss a run)."""
    ledger = open_ledger(settings.ledger, settings.budgets_file)
    try:
        ledger.settle(reservation.id, actual_usd=cost.cost_usd, status=cost.status, reason=cost.stop_reason,
                      mlflow_run_id=mlflow_run_id, detail={"gpu_hours": cost.gpu_hours, "cpu_hours": cost.cpu_hours,
                                                            "metric": cost.metric_name, "value": cost.metric_value})
    finally:
        ledger.dispose()
    client = client_for(settings)
    log_metrics(client, mlflow_run_id, cost.mlflow_metrics() | (speed_metrics or {}), 0)
    client.set_tag(mlflow_run_id, "oppen.cost_status", cost.status)
    create_markdown_artifact(render_cost_markdown(cost, title), key=f"{_key(title)}-cost-report",
                             description=f"cost of {title}: ${cost.cost_usd:.6f}")
    rows = [{"item": key, "value": round(value, 8)} for key, value in sorted(cost.mlflow_metrics().items())]
    create_table_artifact(rows, key=f"{_key(title)}-cost-table", description="cost figures of the run")
    get_run_logger().info("settled: $%.6f (%s), reservation %s", cost.cost_usd, cost.status, reservation.id)
    return cost


def _key(title: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "-" for ch in title.lower()).strip("-")
    return "-".join(part for part in cleaned.split("-") if part)[:40] or "run"
