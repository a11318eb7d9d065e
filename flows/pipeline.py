"""The stages every training flow shares, wrapped by the cost engine.

    admit the request → precheck the budget (quoted from history when there is one)
    → hold the GPU slots (billing starts) → load the data → quote → reserve
    → open the MLflow run → train (metered, capped) → evaluate → log the model → register
    → settle (on every exit, exactly once) → close the MLflow run → summarise → notify

With `cost.defer_to_off_peak`, a run started outside the off-peak window reschedules itself to the
window's start after the precheck and ends `Deferred`, having spent nothing.

Not a flow itself: each workload's flow calls it with a `WorkloadPlan`. Each lifecycle has one
owner that cleans up on every exit: `GpuSlots` releases the slots, `RunBudget` settles the
attempt's money (completed, stopped, failed or preempted), `TrackingRun` closes the MLflow run.
A request refused by its budget ends `OverBudget`, a request that cannot be trained as asked
ends `InvalidRequest`; both before any MLflow run, hold or training step exists. Every ending is
posted to Slack by the notify stage (when Slack is configured); a Slack failure never fails the run.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prefect import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from pydantic import BaseModel

from oppen import tracking_keys as keys
from oppen.cost.budgets import open_ledger
from oppen.cost.ledger import Ledger
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import PriceBook, load_price_book
from oppen.cost.quote import Quote
from oppen.cost.run_budget import TRANSIENT, BudgetRefused, LedgerUnavailable, Outcome, RunBudget, SettledCost
from oppen.cost.speed import epoch_seconds
from oppen.cost.spot import InterruptionSchedule, SpotSimulator
from oppen.cost.utilization import UtilizationSampler
from oppen.errors import RequestError
from oppen.events import RunEventContext
from oppen.metrics.run_cost import budget_reading
from oppen.metrics.run_exporter import RunExporter, RunIdentity
from oppen.settings import OppenSettings, load_settings
from tasks.cost_history import SPEED_KEY_TAG, speed_key
from tasks.cost_tasks import (
    History,
    announce_refusal,
    announce_reservation,
    check_local_resources,
    precheck_budget,
    quote_params,
    quote_run,
)
from tasks.failures import failure_line, logged_by_a_task
from tasks.gpu_slots import GpuSlots
from tasks.mlflow_tasks import TrackingInfo, TrackingRun, register_if_good
from tasks.off_peak import defer_to_off_peak
from tasks.registry import RegisteredVersion
from tasks.run_budget import open_run_budget
from tasks.run_events import announce_registration, link_mlflow_run, report_utilization, run_event_context
from tasks.run_notice import notify_run
from tasks.run_story import StoryCallback, story_logger
from tasks.summary import TrainingSummary, publish_summary, state_message
from tasks.training_tasks import evaluate_model, log_model, train_model
from training.config import RunConfig
from training.errors import DataUnavailable, TrainingRequestError
from training.loop import Trained
from training.results import EvalResult
from training.runtime import select_device
from training.workload import Workload

DEVELOPMENT_ALIAS = "development"
REQUEST_ERRORS = (RequestError, TrainingRequestError)


@dataclass(frozen=True)
class WorkloadPlan:
    """What a workload's flow hands the pipeline: its config, how to check it cheaply, how to load it."""

    name: str  # "mnist", "lm"
    config: BaseModel  # the workload's own config, as requested
    data_source: str  # the local data directory, or "hub": part of the speed-history key
    check: Callable[[], None]  # cheap checks before loading (files, sizes); raises TrainingRequestError
    load: Callable[[], Workload]  # the loader task


@dataclass(frozen=True)
class TrainingRequest:
    plan: WorkloadPlan
    run: RunConfig
    experiment: str
    model_name: str
    threshold: float
    cost: CostPolicy


@dataclass(frozen=True)
class Attempt:
    """What one attempt produced, for the summary."""

    trained: Trained
    evaluation: EvalResult
    model_uri: str
    registered: RegisteredVersion | None
    tracking: TrackingInfo
    settled: SettledCost


def training_pipeline(request: TrainingRequest) -> State:
    settings = load_settings()
    run_key = str(flow_run.get_id() or f"adhoc-{uuid.uuid4()}")
    # Unique per execution: a retried settle repeats it, a rescheduled run gets a new one.
    attempt_id = f"{run_key}:{flow_run.get_run_count()}:{uuid.uuid4().hex[:8]}"
    events = run_event_context(request.cost.team, request.experiment, request.plan.name)
    started = time.perf_counter()
    state = _run(settings, request, events, run_key, attempt_id, started)
    notify_run(settings, request, events, state)
    return state


def _run(settings: OppenSettings, request: TrainingRequest, events: RunEventContext, run_key: str, attempt_id: str,
         started: float) -> State:
    try:
        book, key = admit(settings, request)
        with _ledger(settings) as ledger:
            history = precheck_budget(settings, ledger, book, request.run, request.cost, request.experiment,
                                      request.plan.name, key, run_key, attempt_id, events)
            if request.cost.defer_to_off_peak and (deferral := defer_to_off_peak(book, history.quote)):
                return Completed(name="Deferred", message=deferral.message, data=deferral)
            attempt = run_attempt(settings, ledger, book, request, key, history, run_key, attempt_id, events)
    except BudgetRefused as refused:
        return Failed(name="OverBudget", message=str(refused))
    except REQUEST_ERRORS as error:
        return Failed(name="InvalidRequest", message=_sentence(error))
    except (LedgerUnavailable, DataUnavailable) as error:  # an outage, after retries; nothing was spent
        return Failed(name=type(error).__name__, message=str(error))
    except Exception as error:  # unexpected: the money and the MLflow run were closed by their owners already
        return _failed(error)
    summary = publish_summary(settings, _summary(request, attempt, run_key, time.perf_counter() - started))
    return _final_state(summary, attempt.settled)


def admit(settings: OppenSettings, request: TrainingRequest) -> tuple[PriceBook, str]:
    """Everything that can be checked before anything is held or read: the book, the pool, the data's files."""
    book = load_price_book(settings.price_book)  # a malformed book fails here, before anything is spent
    check_local_resources(request.cost.resources, request.run)
    request.plan.check()
    device = str(select_device(request.run.device))
    config = request.plan.config.model_dump(mode="json", exclude={"data_dir"})
    return book, speed_key(request.plan.name, config, request.plan.data_source, request.run, request.cost.resources,
                           device)


def run_attempt(settings: OppenSettings, ledger: Ledger, book: PriceBook, request: TrainingRequest, key: str,
                history: History, run_key: str, attempt_id: str, events: RunEventContext) -> Attempt:
    plan, run, cost = request.plan, request.run, request.cost
    name = flow_run.get_name() or plan.name
    checkpoint_dir = settings.checkpoint_dir_for(*(run.checkpoint_subdir or f"{plan.name}/{run_key}").split("/"))
    tags = {"oppen.workload": plan.name, "prefect.flow_run_id": run_key, "oppen.team": cost.team, SPEED_KEY_TAG: key}
    with (
        GpuSlots(cost.resources.gpus) as slots,  # billing starts once they are held
        TrackingRun(settings, request.experiment, name, tags, resume_tag="prefect.flow_run_id") as tracking,
        open_run_budget(settings, ledger, book, cost, experiment=request.experiment, workload=plan.name,
                        run_key=run_key, attempt_id=attempt_id, billing_from=slots.acquired_at, tracking=tracking,
                        title=f"{plan.name} run {name}", events=events) as budget,
        # Innermost: its scrape target goes before the money settles; a port it cannot bind is a warning only.
        RunExporter(RunIdentity(flow_run_id=run_key, workload=plan.name, experiment=request.experiment, team=cost.team),
                    cost.resources, port=settings.metrics_port, host=settings.metrics_host,
                    targets_dir=settings.metrics_targets(), cost=lambda: budget_reading(budget)) as metrics,
    ):
        workload = plan.load()
        workload.check_run(run)
        quote = quote_run(book, workload, run, cost, history, time.monotonic() - slots.acquired_at)
        _reserve(budget, quote, request, events)
        tracking.open({"config": plan.config.model_dump(mode="json"), "run": run.model_dump(mode="json"),
                       "cost": cost.model_dump(mode="json"), **quote_params(quote, book)})
        budget.mlflow_run_id = tracking.run_id
        link_mlflow_run(events, tracking.info)
        sampler, spot = UtilizationSampler(), _spot_simulator(book, cost)
        story = StoryCallback(story_logger(), budget.meter)  # after the meter: it reads the epoch's forecast
        watched = metrics.callbacks(expected_epoch_seconds=_expected_epoch_seconds(quote))
        trained = train_model(workload, run, checkpoint_dir, tracking,
                              extra_callbacks=[budget.meter, story, sampler, *watched], spot=spot)
        evaluation = evaluate_model(workload, trained, run, tracking)
        model_uri = log_model(workload, trained, settings, tracking.run_id, request.model_name)
        slots.release()  # the GPUs are free once the model is saved
        registered = register_if_good(settings, request.model_name, model_uri, evaluation, request.threshold,
                                      DEVELOPMENT_ALIAS)
        if registered:
            announce_registration(registered, events, tracking.run_id)
        tracking.log(_speed_metrics(budget, quote, trained, spot), trained.result.steps)
        budget.complete(Outcome(
            stopped=trained.result.stopped_early, metric_name=evaluation.primary_metric,
            metric_value=evaluation.primary_value, higher_is_better=evaluation.higher_is_better,
            baseline=workload.metric_baseline(), utilization=sampler.report,
            spot_lost_seconds=spot.lost_seconds if spot else 0.0,
            spot_interruptions=len(spot.interruptions) if spot else 0, stop_reason=budget.meter.stopped_for_cap,
        ))
        report_utilization(events, book, cost.resources, sampler.report, budget.meter.totals.seconds)
    return Attempt(trained, evaluation, model_uri, registered, tracking.info, budget.settled)


def _reserve(budget: RunBudget, quote: Quote, request: TrainingRequest, events: RunEventContext) -> None:
    try:
        reservation = budget.reserve(quote)
    except BudgetRefused as refused:
        announce_refusal(refused, events, quote)
        raise
    announce_reservation(reservation, request.cost, events)


@contextlib.contextmanager
def _ledger(settings: OppenSettings) -> Iterator[Ledger]:
    try:
        ledger = open_ledger(settings.ledger, settings.budgets_file)
    except TRANSIENT as error:
        raise LedgerUnavailable(f"the budget ledger cannot be reached, so the run was not started: {error}") from error
    try:
        yield ledger
    finally:
        ledger.dispose()


def _expected_epoch_seconds(quote: Quote) -> float | None:
    """An epoch's seconds by this request's own history; a calibration's guess is too rough to watch a run against."""
    return epoch_seconds(quote.speed, quote.shape) if quote.speed.source == "history" else None


def _spot_simulator(book: PriceBook, cost: CostPolicy) -> SpotSimulator | None:
    if not cost.spot:
        return None
    rate = book.spot.interruptions_per_hour if cost.spot_interruptions_per_hour is None else cost.spot_interruptions_per_hour
    return SpotSimulator(InterruptionSchedule(rate, cost.spot_seed))


def _speed_metrics(budget: RunBudget, quote: Quote, trained: Trained, spot: SpotSimulator | None) -> dict[str, float]:
    """This run's speed, for the next quote of the same request (not from interrupted runs: skewed).

    Seconds per sample is the steady speed of the last epoch; what the loop took beyond that (a first
    epoch's warm-up) is a once-per-run cost and goes with the loading into the fixed overhead, so a
    quote is right for one epoch as for ten.
    """
    meter, result = budget.meter, trained.result
    samples = result.samples_per_second * result.train_seconds
    steady_step = meter.timing.last_epoch_step_seconds
    if (spot and spot.interruptions) or result.resumed_from_step or samples <= 0 or not meter.timing.epoch_overheads \
            or not steady_step:
        return {}
    overheads = meter.timing.epoch_overheads
    loop_seconds = max(result.train_seconds - sum(overheads), 1e-9)
    per_sample = min(steady_step / quote.shape.batch_size, loop_seconds / samples)
    warm_up = loop_seconds - samples * per_sample
    meter.tick()
    return {
        keys.SECONDS_PER_SAMPLE: per_sample,
        keys.EPOCH_OVERHEAD_SECONDS: sorted(overheads)[len(overheads) // 2],
        # Loading and quoting (without a calibration's steady part: a run quoted from history skips it), plus
        # the first epoch's warm-up.
        keys.FIXED_OVERHEAD_SECONDS: max(0.0, (meter.seconds_at_train_start or 0.0) - quote.calibration_seconds)
        + warm_up,
        # Measured up to here (registration included); the cost publishing that follows is ~constant.
        keys.TAIL_SECONDS: max(0.0, meter.totals.seconds - (meter.seconds_at_train_end or meter.totals.seconds)),
    }


def _summary(request: TrainingRequest, attempt: Attempt, run_key: str, seconds: float) -> TrainingSummary:
    return TrainingSummary(
        workload=request.plan.name, flow_run_id=run_key, flow_run_name=flow_run.get_name(), experiment=request.experiment,
        mlflow_run_id=attempt.tracking.run_id, mlflow_run_url=attempt.tracking.run_url, model_uri=attempt.model_uri,
        train=attempt.trained.result, evaluation=attempt.evaluation, registered=attempt.registered,
        duration_seconds=seconds, cost=attempt.settled.cost if attempt.settled else None,
        settlement_pending=bool(attempt.settled and attempt.settled.pending),
    )


def _final_state(summary: TrainingSummary, settled: SettledCost | None) -> State:
    """Completed, with the cost in its message; `SettlementPending` when the ledger has not booked it yet."""
    message = state_message(summary)
    if settled is not None and settled.pending:
        return Completed(name="SettlementPending", message=f"{message} · {settled.pending_reason}", data=summary)
    return Completed(message=message, data=summary)


def _failed(error: Exception) -> State:
    """One line first (logged and as the state's message), one traceback at most (see tasks/failures.py)."""
    line = failure_line(error)
    get_run_logger().error("%s", line, exc_info=None if logged_by_a_task(error) else error)
    return Failed(message=f"{line}. What the run recorded before failing (its cost, its MLflow run and metrics) "
                          "is kept.", data=error)


def _sentence(error: BaseException) -> str:
    """A user's mistake in one sentence: the message, without the exception's class or a traceback."""
    text = " ".join(str(error).split())
    return text if text.endswith(".") else text + "."
