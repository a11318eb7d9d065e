"""Prefect tasks that open, close and register into MLflow (thin wrappers over tasks.tracking)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.exceptions import TerminationSignal
from pydantic import BaseModel, ConfigDict

from oppen.settings import OppenSettings
from tasks.metric_sink import MetricSink, SinkReport
from tasks.registry import RegisteredVersion, register_version
from tasks.tracking import client_for, ensure_experiment, finish_run, log_params
from training.results import EvalResult

SINK_CLOSE_TIMEOUT_S = 30.0  # how long a finished run waits for MLflow to take its last metrics


class TrackingInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    experiment: str
    run_url: str | None
    attempt: int = 1


class TrackingRun:
    """The MLflow run of one attempt, opened once the request, the data and the budget have passed.

    Metrics go through a MetricSink, so an MLflow outage never stalls or fails training. On
    every exit the sink is flushed (a gap is recorded as the tag `oppen.metrics_gap`) and the
    run is closed: FINISHED, KILLED (preempted: the next attempt reopens it) or FAILED.
    """

    def __init__(self, settings: OppenSettings, experiment: str, run_name: str, tags: dict[str, str],
                 resume_tag: str | None = None) -> None:
        self.settings, self.experiment, self.run_name = settings, experiment, run_name
        self.tags, self.resume_tag = tags, resume_tag
        self.info: TrackingInfo | None = None
        self.sink: MetricSink | None = None
        self.sink_report: SinkReport | None = None

    def __enter__(self) -> TrackingRun:
        return self

    @property
    def run_id(self) -> str | None:
        return self.info.run_id if self.info else None

    def open(self, params: dict[str, Any]) -> TrackingInfo:
        self.info = open_tracking_run(self.settings, self.experiment, self.run_name, params, self.tags, self.resume_tag)
        self.sink = MetricSink(client_for(self.settings), self.info.run_id)
        return self.info

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.sink is not None:
            self.sink.log(metrics, step)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.info is None:
            return False
        logger = get_run_logger()
        self.sink_report = self.sink.close(SINK_CLOSE_TIMEOUT_S)
        if not self.sink_report.complete or self.sink_report.failures:
            logger.warning("MLflow: %s", self.sink_report.describe())
        status = "FINISHED" if exc is None else "KILLED" if isinstance(exc, TerminationSignal) else "FAILED"
        try:
            if not self.sink_report.complete:
                client_for(self.settings).set_tag(self.info.run_id, "oppen.metrics_gap", self.sink_report.describe())
            close_tracking_run(self.settings, self.info, status)
        except Exception as error:  # MLflow still down: the run stays open there; nothing else is lost
            logger.error("could not close MLflow run %s as %s: %s", self.info.run_id, status, error)
        return False


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def open_tracking_run(
    settings: OppenSettings, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
    resume_tag: str | None = None,
) -> TrackingInfo:
    """Create the MLflow run and record the full config (the request has passed every check by now).

    With `resume_tag` (a tag key in `tags`): a run already carrying the same value is reopened
    instead, so a preempted and rescheduled flow run keeps one MLflow run with one metric history.
    """
    client = client_for(settings)
    experiment_id = ensure_experiment(client, experiment, settings.artifact_root)
    run = _earlier_attempt(client, experiment_id, resume_tag, tags) if resume_tag else None
    attempt = 1
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
    return TrackingInfo(run_id=run.info.run_id, experiment_id=experiment_id, experiment=experiment, run_url=url,
                        attempt=attempt)


def _earlier_attempt(client, experiment_id: str, tag: str, tags: dict[str, str]):
    value = tags.get(tag)
    if not value:
        return None
    found = client.search_runs([experiment_id], f"tags.`{tag}` = '{value}'", max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


@task(retries=2, retry_delay_seconds=[1, 5], cache_policy=NONE)
def close_tracking_run(settings: OppenSettings, tracking: TrackingInfo, status: str) -> None:
    """FINISHED, FAILED or KILLED (preempted); metrics logged so far stay with the run."""
    finish_run(client_for(settings), tracking.run_id, status)


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
