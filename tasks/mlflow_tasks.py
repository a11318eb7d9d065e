"""Prefect tasks that open, close and register into MLflow (thin wrappers over tasks.tracking)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict

from oppen.settings import OppenSettings
from tasks.registry import RegisteredVersion, register_version
from tasks.tracking import client_for, ensure_experiment, finish_run, log_params
from training.results import EvalResult


class TrackingRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    experiment: str
    run_url: str | None


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def open_tracking_run(
    settings: OppenSettings, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
    resume_tag: str | None = None,
) -> TrackingRun:
    """Create the MLflow run and record the full config before any compute is spent.

    With `resume_tag` (a tag key in `tags`): a run already carrying the same value is reopened
    instead, so a preempted and rescheduled flow run keeps one MLflow run with one metric history.
    """
    client = client_for(settings)
    experiment_id = ensure_experiment(client, experiment, settings.artifact_root)
    run = _earlier_attempt(client, experiment_id, resume_tag, tags) if resume_tag else None
    if run is not None:
        attempt = int(run.data.tags.get("oppen.attempt", "1")) + 1
        client.update_run(run.info.run_id, status="RUNNING")
        client.set_tag(run.info.run_id, "oppen.attempt", str(attempt))
        get_run_logger().info("resuming MLflow run %s (attempt %d of this flow run)", run.info.run_id, attempt)
    else:
        run = client.create_run(experiment_id, run_name=run_name, tags=tags | {"oppen.attempt": "1"})
        log_params(client, run.info.run_id, params)
        client.log_dict(run.info.run_id, params, "config.json")  # the exact, typed config, not just strings
    url = f"{settings.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run.info.run_id}" if settings.ui_url else None
    get_run_logger().info("MLflow run %s in experiment %r%s", run.info.run_id, experiment, f": {url}" if url else "")
    return TrackingRun(run_id=run.info.run_id, experiment_id=experiment_id, experiment=experiment, run_url=url)


def _earlier_attempt(client, experiment_id: str, tag: str, tags: dict[str, str]):
    value = tags.get(tag)
    if not value:
        return None
    found = client.search_runs([experiment_id], f"tags.`{tag}` = '{value}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def close_tracking_run(settings: OppenSettings, tracking: TrackingRun, failed: bool, status: str | None = None) -> None:
    """FINISHED or FAILED (KILLED for a run its budget refused); metrics logged so far stay with the run."""
    finish_run(client_for(settings), tracking.run_id, failed, status)


@task(cache_policy=NONE)
def register_if_good(
    settings: OppenSettings, model_name: str, model_uri: str, evaluation: EvalResult, threshold: float, alias: str
) -> RegisteredVersion | None:
    """Register the model under `alias` when its primary metric passes `threshold`."""
    logger = get_run_logger()
    value = evaluation.primary_value
    passes = value >= threshold if evaluation.higher_is_better else value <= threshold
    comparison = ">=" if evaluation.higher_is_better else "<="
    if not passes:
        logger.warning(
            "not registering %s: %s=%.4f does not meet %s %s", model_name, evaluation.primary_metric, value, comparison, threshold
        )
        return None
    version = register_version(
        settings, model_name, model_uri, evaluation.primary_metric, value, evaluation.higher_is_better, alias
    )
    logger.info("registered %s version %d with alias %r (%s=%.4f)", model_name, version.version, alias,
                evaluation.primary_metric, value)
    return version
