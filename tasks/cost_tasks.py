"""Prefect tasks of the cost engine: thin wrappers that call oppen.cost and record what it decided."""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel

from oppen import tracking_keys as keys
from oppen.cost.cost_story import cost_rows, headline, render_cost_markdown
from oppen.cost.ledger import Ledger, Reservation, UnknownTeamError, utcnow
from oppen.cost.meter import CostEvent, ForecastPoint
from oppen.cost.money import format_usd, to_micros
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import PriceBook, Resources
from oppen.cost.quote import Quote, make_quote
from oppen.cost.run_budget import BudgetRefused, SettledCost, least_hold_micros
from oppen.cost.speed import PastRun, RunShape, from_calibration, from_history
from oppen.display import usd
from oppen.errors import RequestError
from oppen.events import BUDGET_REFUSED, BUDGET_WARNING, RunEventContext, emit_run_event
from oppen.settings import OppenSettings
from oppen.story import quote_line, reserved_line
from tasks.artifacts import artifact_key
from tasks.cost_history import past_runs
from tasks.retry import transient_only
from tasks.run_story import story_logger
from tasks.tracking import client_for, log_metrics
from training.calibrate import calibrate
from training.config import RunConfig
from training.workload import Workload

# Measured through train-mnist/local: logging the model, registering it and settling take ~0.8-1.2 s after
# the test pass on a local MLflow store (explicit pip requirements, pickle serialization).
TAIL_LOGGING_SECONDS = 1.0


class ResourceRequestError(RequestError):
    """The request asks for what this pool cannot give (e.g. more GPUs than the machine has)."""


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


def shape_of(steps_per_epoch: int, run: RunConfig) -> RunShape:
    total = steps_per_epoch * run.epochs
    return RunShape(total_steps=min(total, run.max_steps) if run.max_steps else total,
                    steps_per_epoch=steps_per_epoch, batch_size=run.batch_size)


def _quote(book: PriceBook, policy: CostPolicy, run: RunConfig, speed, shape: RunShape) -> Quote:
    checkpoint_interval = None
    if run.checkpoint_every_steps:
        checkpoint_interval = run.checkpoint_every_steps * run.batch_size * speed.seconds_per_sample
    return make_quote(book, policy.resources, speed, shape, utcnow(), spot=policy.spot,
                      spot_rate_per_hour=policy.spot_interruptions_per_hour, checkpoint_interval_s=checkpoint_interval)


class History(BaseModel):
    """This request's past runs (newest first), and the quote they give before any data is read."""

    runs: list[PastRun]
    quote: Quote | None


def read_history(settings: OppenSettings, book: PriceBook, run: RunConfig, policy: CostPolicy, key: str) -> History:
    """This request's speed and size history in MLflow, and the quote it gives before any data is read."""
    runs = past_runs(client_for(settings), key)
    speed = from_history(runs)
    steps_per_epoch = next((past.steps_per_epoch for past in runs if past.steps_per_epoch), None)
    if speed is None or steps_per_epoch is None:
        return History(runs=runs, quote=None)
    return History(runs=runs, quote=_quote(book, policy, run, speed, shape_of(steps_per_epoch, run)))


@task(cache_policy=NONE, retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=transient_only)
def precheck_budget(settings: OppenSettings, ledger: Ledger, book: PriceBook, run: RunConfig, policy: CostPolicy,
                    experiment: str, workload: str, key: str, run_key: str, attempt_id: str,
                    events: RunEventContext) -> History:
    """Before the data is read: an unknown team, an exhausted budget, or a quote from history that cannot fit.

    A refusal here is recorded in the ledger like one at reservation, and costs nothing. Returns the
    request's history, which the quote after loading uses too.
    """
    history = read_history(settings, book, run, policy, key)
    _refuse_if_over(ledger, policy, experiment, workload, run_key, attempt_id, history.quote, events)
    return history


def _refuse_if_over(ledger: Ledger, policy: CostPolicy, experiment: str, workload: str, run_key: str,
                    attempt_id: str, quote: Quote | None, events: RunEventContext) -> None:
    if policy.team not in ledger.team_names():
        raise UnknownTeamError(
            f"unknown team {policy.team!r} (known: {', '.join(ledger.team_names())}); "
            "add it to the budgets file and run `oppen budgets apply`"
        )
    reason = _cap_left_too_small(ledger, policy, run_key, quote)
    if reason is None:
        request = 0
        if quote is not None:
            request = to_micros(quote.p90_usd)
            if policy.max_cost_usd is not None:
                request = min(request, to_micros(policy.max_cost_usd, ceiling=True))
        uses = ledger.budget_uses(policy.team, experiment, request)
        exhausted = [use for use in uses if use.used_micros >= use.amount_micros]
        over = exhausted or [use for use in uses if not use.fits]
        if not over:
            return
        if exhausted:
            reason = "; ".join(f"budget exhausted: {use.describe()}" for use in exhausted)
        else:
            reason = "; ".join(f"over budget (quoted from history, before loading): {use.describe()}" for use in over)
    ledger.refuse(team=policy.team, experiment=experiment, run_key=run_key, attempt_id=attempt_id, reason=reason,
                  workload=workload, quote_micros=to_micros(quote.expected_usd) if quote else 0,
                  cap_micros=to_micros(policy.max_cost_usd, ceiling=True) if policy.max_cost_usd is not None else None)
    emit_run_event(events, BUDGET_REFUSED, {"reason": reason, "stage": "precheck",
                                            "quote_usd": quote.expected_usd if quote else None})
    raise BudgetRefused(f"refused before loading: {reason}")


def _cap_left_too_small(ledger: Ledger, policy: CostPolicy, run_key: str, quote: Quote | None) -> str | None:
    """A rescheduled run whose cap its earlier attempts (nearly) spent: refused before it loads anything again."""
    if policy.max_cost_usd is None:
        return None
    earlier = ledger.attempts_of(run_key)
    if not earlier:
        return None
    prior = sum(a["held_micros"] if a["status"] == "running" else (a["cost_micros"] or 0) for a in earlier)
    left = to_micros(policy.max_cost_usd, ceiling=True) - prior
    needed = least_hold_micros(quote, quote.speed.fixed_overhead_seconds) if quote is not None else 1
    if left >= needed:
        return None
    return (f"run cap {format_usd(to_micros(policy.max_cost_usd, ceiling=True))} has {format_usd(max(left, 0))} left after its "
            f"earlier attempts ({format_usd(prior)}), less than another attempt needs ({format_usd(needed)})")


@task(cache_policy=NONE)
def quote_run(book: PriceBook, workload: Workload, run: RunConfig, policy: CostPolicy, history: History,
              fixed_overhead_seconds: float) -> Quote:
    """Expected cost and p90 from this request's speed history, else from a short calibration."""
    speed, spent, measured = from_history(history.runs), 0.0, None
    if speed is None:
        started = time.perf_counter()
        measured = calibrate(workload, run, policy.calibration_steps)
        spent = time.perf_counter() - started
        # Fixed time = loading + this calibration (both already billed). The tail after training (the
        # test pass, ~2 validation passes, and model logging) is estimated until history replaces it.
        tail = 2 * measured.eval_seconds + TAIL_LOGGING_SECONDS
        speed = from_calibration(measured.step_seconds, run.batch_size, measured.eval_seconds,
                                 fixed_overhead_seconds + spent, tail)
        get_run_logger().info("no speed history for this request: calibrated %d steps in %.1fs",
                              len(measured.step_seconds), spent)
    quote = _quote(book, policy, run, speed, shape_of(workload.steps_per_epoch(run.batch_size), run))
    if spent:
        # Its steady part only (timed steps, one evaluation): its warm-up is a cost every run pays once, so it
        # stays in the loading time the speed history records (a run quoted from history pays it in training).
        quote = quote.model_copy(update={"calibration_seconds": sum(measured.step_seconds) + measured.eval_seconds})
    cheapest = None if quote.cheapest_start <= quote.start else f"{quote.cheapest_start:%Y-%m-%d %H:%M} UTC"
    runs = quote.speed.observations
    basis = (f"from history ({runs} run{'s' if runs != 1 else ''})" if quote.speed.source == "history"
             else f"from a {quote.speed.observations}-step calibration")
    story_logger().info(quote_line(quote.expected_usd, quote.p90_usd, quote.expected_seconds, basis, cheapest,
                                   quote.saving_usd))
    return quote


def quote_params(quote: Quote, book: PriceBook) -> dict[str, dict[str, object]]:
    """The first attempt's quote and the rates it used, as MLflow params (constants of the run, not metrics)."""
    return {
        "quote": {
            "expected_usd": quote.expected_usd, "p90_usd": quote.p90_usd,
            "expected_seconds": round(quote.expected_seconds, 1), "cost_per_epoch_usd": quote.cost_per_epoch_usd,
            "cheapest_start": quote.cheapest_start.isoformat(timespec="minutes"), "cheapest_usd": quote.cheapest_usd,
            "saving_usd": quote.saving_usd, "basis": f"{quote.speed.source}, {quote.speed.observations} obs",
        },
        "rate": {
            "hourly_usd": quote.hourly_usd, "off_peak_discount": book.off_peak.discount,
            "off_peak_window": f"{book.off_peak.start:%H:%M}-{book.off_peak.end:%H:%M} {book.off_peak.timezone}",
            "spot_discount": book.spot.discount,
        },
        "shape": {"steps_per_epoch": quote.shape.steps_per_epoch},
    }


def announce_reservation(reservation: Reservation, policy: CostPolicy, events: RunEventContext) -> None:
    """Log the hold, and warn (log line + event) for every budget past the warning fraction."""
    logger = get_run_logger()
    for use in reservation.warnings(policy.warn_fraction):
        logger.warning("budget warning: %s", use.describe())
        emit_run_event(events, BUDGET_WARNING, {
            "scope": use.scope, "amount_usd": use.amount_micros / 1e6, "used_usd": use.used_micros / 1e6,
            "request_usd": use.request_micros / 1e6, "fraction": use.fraction_after,
        })
    story_logger().info(reserved_line(
        reservation.held_micros / 1e6, reservation.attempt_number,
        policy.max_cost_usd, reservation.prior_micros / 1e6 if reservation.reused else 0.0))


def announce_refusal(error: BudgetRefused, events: RunEventContext, quote: Quote | None) -> None:
    get_run_logger().error("%s", error)
    emit_run_event(events, BUDGET_REFUSED, {
        "reason": str(error), "stage": "reserve", "quote_usd": quote.expected_usd if quote else None})


class PrefectCostReporter:
    """Where the meter's forecasts and threshold events go: MLflow metrics, log lines and Prefect events."""

    def __init__(self, tracking, events: RunEventContext) -> None:
        self.tracking, self.events = tracking, events
        self.logger = get_run_logger()

    def forecast(self, point: ForecastPoint) -> None:
        # To the nano-dollar (the meter's floats carry 17 digits of noise, which MLflow would print).
        metrics = {keys.COST_FORECAST: round(point.forecast_usd, 9), keys.COST_ACCRUED: round(point.accrued_usd, 9)}
        if point.epoch_usd is not None:
            metrics[keys.COST_EPOCH] = round(point.epoch_usd, 9)  # what this epoch cost on its own
        self.tracking.log(metrics, point.step)

    def event(self, event: CostEvent) -> None:
        if event.name == "oppen.cost.threshold":
            self.logger.warning("cost reached %.0f%% of the %s (%s of %s)", event.payload["fraction"] * 100,
                                "run's cap" if event.payload["of"] == "cap" else f"{event.payload['of']} budget",
                                usd(event.payload["accrued_usd"]), usd(event.payload["of_usd"]))
        else:
            self.logger.warning("%s: %s", event.name, event.payload)
        emit_run_event(self.events, event.name, event.payload)


@task(cache_policy=NONE, retries=3, retry_delay_seconds=[1, 3, 10])
def publish_cost(settings: OppenSettings, settled: SettledCost, mlflow_run_id: str | None, title: str) -> None:
    """MLflow gets the ledger's figures and the cost report; retried alone, it never books anything again."""
    if not mlflow_run_id:
        return
    cost = settled.cost
    client = client_for(settings)
    # Step = the attempt: cost/attempt_usd keeps each attempt's part, cost/total_usd ends at the run's total.
    log_metrics(client, mlflow_run_id, cost.mlflow_metrics(), cost.attempt, tags={
        "oppen.cost_status": cost.status, "oppen.settlement": "pending" if settled.pending else "booked"})
    client.log_text(mlflow_run_id, render_cost_markdown(cost, title, _booking(settled)), "cost_report.md")


def publish_cost_artifacts(settled: SettledCost, title: str) -> None:
    """The cost report and its table as artifacts of the flow run itself (made in the flow, not in a task, so
    Prefect lists them under the flow run), each description leading with the amount."""
    cost = settled.cost
    headline_text = headline(cost)
    create_markdown_artifact(render_cost_markdown(cost, title, _booking(settled)), key=artifact_key("cost"),
                             description=f"{headline_text}: cost of {title}")
    create_table_artifact([{"figure": figure, "value": value} for figure, value in cost_rows(cost)],
                          key=artifact_key("cost-table"), description=f"{headline_text}: cost figures of {title}")


def _booking(settled: SettledCost) -> str:
    return f"not yet in the ledger: {settled.pending_reason}" if settled.pending else "booked in the ledger"
