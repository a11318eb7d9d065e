"""The typed result of a training flow and its markdown summary artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict

from oppen.cost.settlement import RunCost
from tasks.registry import RegisteredVersion
from training.results import EvalResult, TrainResult


class TrainingSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    workload: str
    flow_run_id: str | None
    experiment: str
    mlflow_run_id: str
    mlflow_run_url: str | None
    model_uri: str
    train: TrainResult
    evaluation: EvalResult
    registered: RegisteredVersion | None
    duration_seconds: float
    cost: RunCost | None = None
    settlement_pending: bool = False  # the ledger could not be reached: the cost waits for `oppen reconcile`


def render_markdown(summary: TrainingSummary) -> str:
    train, evaluation = summary.train, summary.evaluation
    run_link = f"[{summary.mlflow_run_id}]({summary.mlflow_run_url})" if summary.mlflow_run_url else summary.mlflow_run_id
    registered = (
        f"`{summary.registered.name}` version {summary.registered.version}, alias `{summary.registered.alias}`"
        if summary.registered
        else "not registered (below threshold)"
    )
    stopped = f"stopped early: {train.stop_reason}" if train.stopped_early else "completed"
    lines = [
        f"# {summary.workload} training run",
        "",
        "| | |",
        "| --- | --- |",
        f"| {evaluation.primary_metric} ({evaluation.split}) | {evaluation.primary_value:.4f} |",
        f"| steps | {train.steps} / {train.total_steps} ({stopped}) |",
        f"| epochs completed | {train.epochs_completed} |",
        f"| training time | {train.train_seconds:.1f} s on {train.device} ({train.samples_per_second:.0f} samples/s) |",
        f"| flow duration | {summary.duration_seconds:.1f} s |",
        f"| parameters | {train.num_parameters:,} |",
        f"| MLflow run | {run_link} (experiment `{summary.experiment}`) |",
        f"| model | `{summary.model_uri}` |",
        f"| registry | {registered} |",
        *(
            [f"| cost | ${summary.cost.cost_usd:.6f} ({summary.cost.status}; quote ${summary.cost.quote_expected_usd or 0:.6f}) |"]
            if summary.cost else []
        ),
        "",
        "## Epochs",
        "",
        "| epoch | step | train loss | " + " | ".join(sorted(train.history[0].metrics)) + " | seconds | samples/s |"
        if train.history
        else "(no complete epoch)",
    ]
    if train.history:
        lines.append("|" + " --- |" * (5 + len(train.history[0].metrics)))
        for record in train.history:
            values = " | ".join(f"{record.metrics[key]:.4f}" for key in sorted(record.metrics))
            lines.append(
                f"| {record.epoch} | {record.step} | {record.train_loss:.4f} | {values} | "
                f"{record.epoch_seconds:.1f} | {record.samples_per_second:.0f} |"
            )
    return "\n".join(lines) + "\n"


@task(cache_policy=NONE)
def publish_summary(summary: TrainingSummary) -> TrainingSummary:
    """A markdown artifact on the flow run that summarises the finished run."""
    create_markdown_artifact(
        markdown=render_markdown(summary), key=f"{summary.workload}-run-summary", description="Training run summary"
    )
    return summary
