"""Prefect tasks that open, close and register into MLflow (thin wrappers over tasks.tracking)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.exceptions import TerminationSignal
from pydantic import BaseModel, ConfigDict

from oppen.display import metric_phrase
from oppen.links import mlflow_run_url
from oppen.settings import OppenSettings
from oppen.story import not_registered_line, registered_line
from oppen.tracking_keys import DESCRIPTION_TAG
from tasks.metric_sink import MetricSink, SinkReport
from tasks.registry import RegisteredVersion, register_version
from tasks.run_story import story_logger
from tasks.tracking import client_for, ensure_experiment, finish_run, log_params
from training.results import EvalResult

SINK_CLOSE_TIMEOUT_S = 30.0  # how long a finished run waits for MLflow to take its last metrics
# MLflow's system-metrics monitor samples CPU, memory, disk, network and (with nvidia-ml-py and a GPU) the GPUs;
# every 5 s gives a short run a curve without costing training anything measurable (it runs on its own thread).
SYSTEM_METRICS_INTERVAL_S = 5.0


class TrackingInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    experiment_id: str
    experiment: str
    run_url: str | None
    attempt: int = 1


class TrackingRun:
    """The MLflow run of one attempt, opened once the request, the data and the budget have passed.

    Metrics go through a MetricSink, so an MLflow outage never stalls or fails training; MLflow's
    own system-metrics monitor draws the machine's `system/` curves beside them. On every exit the
    monitor is stopped, the sink is flushed (a gap is recorded as the tag `oppen.metrics_gap`) and
    the run is closed: FINISHED, KILLED (preempted: the next attempt reopens it) or FAILED.
    """

    def __init__(self, settings: OppenSettings, experiment: str, run_name: str, tags: dict[str, str],
                 resume_tag: str | None = None) -> None:
        self.settings, self.experiment, self.run_name = settings, experiment, run_name
        self.tags, self.resume_tag = tags, resume_tag
        self.info: TrackingInfo | None = None
        self.sink: MetricSink | None = None
        self.sink_report: SinkReport | None = None
        self.monitor = None

    def __enter__(self) -> TrackingRun:
        return self

    @property
    def run_id(self) -> str | None:
        return self.info.run_id if self.info else None

    def open(self, params: dict[str, Any]) -> TrackingInfo:
        self.info = open_tracking_run(self.settings, self.experiment, self.run_name, params, self.tags, self.resume_tag)
        self.sink = MetricSink(client_for(self.settings), self.info.run_id)
        self.monitor = start_system_metrics(self.settings, self.info)
        return self.info

    def describe(self, text: str) -> None:
        """The run's description in MLflow (markdown, shown at the top of its overview)."""
        if self.info is not None:
            client_for(self.settings).set_tag(self.info.run_id, DESCRIPTION_TAG, text)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.info is not None:
            client_for(self.settings).log_text(self.info.run_id, text, artifact_file)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if self.sink is not None:
            self.sink.log(metrics, step)

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.info is None:
            return False
        logger = get_run_logger()
        if self.monitor is not None:
            self.monitor.finish()  # joins its thread and sends its last samples
            self.monitor = None
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


def start_system_metrics(settings: OppenSettings, info: TrackingInfo):
    """MLflow's SystemMetricsMonitor on this run (a resumed attempt continues its steps); None if it cannot start."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(info.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       resume_logging=info.attempt > 1, tracking_uri=settings.tracking_uri)
        monitor.start()
        return monitor
    except Exception as error:  # a missing sensor never costs the run: the curves are a view, not a record
        get_run_logger().warning("MLflow system metrics are off for this run: %s", error)
        return None


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
    url = mlflow_run_url(settings.ui_url, experiment_id, run.info.run_id)
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
    story = story_logger()
    value = evaluation.primary_value
    passes = value >= threshold if evaluation.higher_is_better else value <= threshold
    if not passes:
        story.warning(not_registered_line(evaluation.primary_metric, value, threshold, evaluation.higher_is_better))
        return None
    version = register_version(
        settings, model_name, model_uri, evaluation.primary_metric, value, evaluation.higher_is_better, alias,
        description=f"{metric_phrase(evaluation.primary_metric, value)} on {evaluation.samples:,} held-out samples "
                    f"({evaluation.split} split); trained by Oppen's {model_name} training flow.",
    )
    story.info(registered_line(model_name, version.version, alias))
    return version
