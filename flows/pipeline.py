"""The stages every training flow shares: track → load → train → evaluate → log → register → summarise.

Not a flow itself: each workload's flow calls it with its own loader task. The cost engine's
quote/reserve (before `train`) and settle (after it) attach at the marked seams.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect.runtime import flow_run

from oppen.settings import load_settings
from tasks.mlflow_tasks import close_tracking_run, open_tracking_run, register_if_good
from tasks.summary import TrainingSummary, publish_summary
from tasks.training_tasks import evaluate_model, log_model, train_model
from training.config import RunConfig
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
) -> TrainingSummary:
    settings = load_settings()
    started = time.perf_counter()
    flow_run_id = flow_run.get_id()
    if run.checkpoint_dir is None:
        # Per flow run: a rescheduled (preempted) run keeps its id, so it finds and resumes its checkpoint.
        run = run.model_copy(update={"checkpoint_dir": settings.checkpoint_dir_for(workload_name, flow_run_id or "adhoc")})
    tracking = open_tracking_run(
        settings,
        experiment,
        run_name=flow_run.get_name() or workload_name,
        params=params | {"run": run.model_dump(mode="json")},
        tags={"oppen.workload": workload_name, "prefect.flow_run_id": str(flow_run_id)},
    )
    try:
        workload = load()
        # seam: quote and reserve go here, before any compute is spent.
        trained = train_model(workload, run, settings, tracking.run_id)
        evaluation = evaluate_model(workload, trained, run, settings, tracking.run_id)
        model_uri = log_model(workload, trained, settings, tracking.run_id)
        registered = register_if_good(settings, model_name, model_uri, evaluation, threshold, DEVELOPMENT_ALIAS)
        # seam: settle goes here (and in the failure path below).
    except BaseException:
        close_tracking_run(settings, tracking, failed=True)
        raise
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
        )
    )
