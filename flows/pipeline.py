"""The stages every training flow shares, wrapped by the cost engine:

check → open MLflow run → load → quote → reserve → train (metered, capped) → evaluate → log →
register → settle → summarise.

Not a flow itself: each workload's flow calls it with its own loader task. A run refused by its
budget ends in a Failed state named `OverBudget` with the reason, before any training; a run
that fails or is stopped still settles what it spent.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Failed, State

from oppen.cost.ledger import utcnow
from oppen.cost.meter import CostMeter
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import load_price_book
from oppen.cost.settlement import settle_from_meter
from oppen.cost.spot import InterruptionSchedule, SpotSimulator
from oppen.cost.utilization import UtilizationSampler
from oppen.settings import load_settings
from tasks.cost_tasks import (
    BudgetRefused,
    PrefectCostReporter,
    check_local_resources,
    make_meter,
    precheck_budget,
    quote_run,
    reserve_budget,
    settle_run,
)
from tasks.gpu_slots import hold_gpu_slots
from tasks.mlflow_tasks import close_tracking_run, open_tracking_run, register_if_good
from tasks.summary import TrainingSummary, publish_summary
from tasks.training_tasks import evaluate_model, log_model, train_model
from training.config import RunConfig
from training.loop import Trained
from training.workload import Workload

DEVELOPMENT_ALIAS = "development"


def training_pipeline(
    *,
    workload_name: str,
    load: Callable[[], Workload],
    run: RunConfig,
    params: dict[str, Any],
    experiment: str,
    model_name: str,
    threshold: float,
    cost: CostPolicy,
) -> TrainingSummary | State:
    settings = load_settings()
    started_at = utcnow()
    started = time.perf_counter()
    book = load_price_book(settings.price_book)  # a malformed book fails here, before anything is spent
    check_local_resources(cost.resources, run)
    precheck_budget(settings, cost, experiment)
    flow_run_id = flow_run.get_id()
    if run.checkpoint_dir is None:
        # Per flow run: a rescheduled (preempted) run keeps its id, so it finds and resumes its checkpoint.
        run = run.model_copy(update={"checkpoint_dir": settings.checkpoint_dir_for(workload_name, flow_run_id or "adhoc")})
    tracking = open_tracking_run(
        settings,
        experiment,
        run_name=flow_run.get_name() or workload_name,
        params=params | {"run": run.model_dump(mode="json"), "cost": cost.model_dump(mode="json")},
        tags={"oppen.workload": workload_name, "prefect.flow_run_id": str(flow_run_id), "oppen.team": cost.team},
        resume_tag="prefect.flow_run_id" if flow_run_id else None,
    )
    reservation, meter, quote = None, None, None
    title = f"{workload_name} run {flow_run.get_name() or tracking.run_id}"
    gpu_slots = contextlib.ExitStack()
    try:
        # Before loading: a run waiting for GPU slots has not started spending.
        gpu_slots.enter_context(hold_gpu_slots(cost.resources.gpus))
        workload = load()
        load_seconds = time.perf_counter() - started
        quote, _ = quote_run(settings, book, workload, run, cost, load_seconds, tracking.run_id)
        reservation = reserve_budget(settings, cost, experiment, workload_name, quote, tracking.run_id)
        meter = make_meter(book, cost, quote, reservation, PrefectCostReporter(settings, tracking.run_id, cost.team),
                           started_at)
        sampler = UtilizationSampler()
        spot = _spot_simulator(book, cost)
        trained = train_model(workload, run, settings, tracking.run_id, extra_callbacks=[meter, sampler], spot=spot)
        evaluation = evaluate_model(workload, trained, run, settings, tracking.run_id)
        model_uri = log_model(workload, trained, settings, tracking.run_id)
        gpu_slots.close()  # the GPUs are free once the model is saved
        registered = register_if_good(settings, model_name, model_uri, evaluation, threshold, DEVELOPMENT_ALIAS)
        run_cost = settle_from_meter(
            meter, status="stopped" if trained.result.stopped_early else "settled", resources=cost.resources,
            quote=quote, metric_name=evaluation.primary_metric, metric_value=evaluation.primary_value,
            higher_is_better=evaluation.higher_is_better, baseline=workload.metric_baseline(),
            lost_seconds=spot.lost_seconds if spot else 0.0, interruptions=len(spot.interruptions) if spot else 0,
            utilization=sampler.report, stop_reason=meter.stopped_for_cap,
        )
        settle_run(settings, reservation, run_cost, tracking.run_id, title,
                   speed_metrics=_speed_metrics(meter, trained, spot))
    except BudgetRefused as refused:
        close_tracking_run(settings, tracking, failed=True, status="KILLED")
        return Failed(name="OverBudget", message=str(refused))
    except TerminationSignal:
        # Eviction, preemption or spot reclaim. Prefect reschedules this flow run (same id), which
        # reopens this reservation and MLflow run and resumes from the last checkpoint; what ran
        # until now is paid for and recorded as preempted.
        if reservation is not None and meter is not None:
            preempted = settle_from_meter(meter, status="preempted", resources=cost.resources, quote=quote,
                                          metric_name=None, metric_value=None,
                                          stop_reason="SIGTERM: rescheduled, resumes from its last checkpoint")
            settle_run(settings, reservation, preempted, tracking.run_id, title)
        close_tracking_run(settings, tracking, failed=True, status="KILLED")
        raise
    except BaseException as error:
        if reservation is not None and meter is not None:
            # What was spent is spent: the ledger records it and releases the rest of the hold.
            failed_cost = settle_from_meter(meter, status="failed", resources=cost.resources, quote=quote,
                                            metric_name=None, metric_value=None,
                                            stop_reason=f"{type(error).__name__}: {error}"[:500])
            settle_run(settings, reservation, failed_cost, tracking.run_id, title)
        close_tracking_run(settings, tracking, failed=True)
        raise
    finally:
        gpu_slots.close()
    close_tracking_run(settings, tracking, failed=False)
    return publish_summary(
        TrainingSummary(
            workload=workload_name,
            flow_run_id=str(flow_run_id) if flow_run_id else None,
            experiment=experiment,
            mlflow_run_id=tracking.run_id,
            mlflow_run_url=tracking.run_url,
            model_uri=model_uri,
            train=trained.result,
            evaluation=evaluation,
            registered=registered,
            duration_seconds=time.perf_counter() - started,
            cost=run_cost,
        )
    )


def _spot_simulator(book, cost: CostPolicy) -> SpotSimulator | None:
    if not cost.spot:
        return None
    rate = book.spot.interruptions_per_hour if cost.spot_interruptions_per_hour is None else cost.spot_interruptions_per_hour
    return SpotSimulator(InterruptionSchedule(rate, cost.spot_seed))


def _speed_metrics(meter: CostMeter, trained: Trained, spot: SpotSimulator | None) -> dict[str, float]:
    """This run's speed, for the next quote of the same config (not from interrupted runs: skewed)."""
    result = trained.result
    samples = result.samples_per_second * result.train_seconds
    if (spot and spot.interruptions) or samples <= 0 or not meter.timing.epoch_overheads:
        return {}
    overheads = meter.timing.epoch_overheads
    loop_seconds = result.train_seconds - sum(overheads)
    return {
        "cost_seconds_per_sample": max(loop_seconds, 1e-9) / samples,
        "cost_epoch_overhead_s": sorted(overheads)[len(overheads) // 2],
        "cost_fixed_overhead_s": meter.seconds_at_train_start or 0.0,
        "cost_tail_s": max(0.0, meter.totals.seconds - (meter.seconds_at_train_end or meter.totals.seconds)),
    }
