"""The typed result of a training flow, told where users look: a Prefect artifact, MLflow's run and version.

The markdown summary is a Prefect artifact (keyed per deployment) and an MLflow run artifact
(`summary.md`); the MLflow run's description and the registered version's description lead with
the cost and the result, so both UIs answer "what did it cost and what did it buy" at a glance.
"""

from __future__ import annotations

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict

from oppen.cost.cost_story import headline
from oppen.cost.settlement import RunCost
from oppen.display import duration, metric_phrase, metric_text, usd
from oppen.links import prefect_flow_run_url
from oppen.settings import OppenSettings
from oppen.tracking_keys import DESCRIPTION_TAG
from tasks.artifacts import artifact_key
from tasks.registry import RegisteredVersion
from tasks.tracking import client_for
from training.results import EvalResult, TrainResult


class TrainingSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    workload: str
    flow_run_id: str | None
    flow_run_name: str | None = None
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


def result_phrase(summary: TrainingSummary) -> str:
    """"test accuracy 99.15%"."""
    return metric_phrase(summary.evaluation.primary_metric, summary.evaluation.primary_value)


def state_message(summary: TrainingSummary) -> str:
    """The Completed state's message: "$0.000291 of $0.0005 cap (58.2%) · test accuracy 99.15%"."""
    cost = summary.cost
    if cost is None:
        return result_phrase(summary)
    stopped = ", stopped at its cap" if cost.status == "stopped" else ""
    return f"{headline(cost)}{stopped} · {result_phrase(summary)}"


def describe(summary: TrainingSummary) -> str:
    """The MLflow run's description (markdown): the cost and the result first, then how it got there."""
    train, cost = summary.train, summary.cost
    lines = [f"**{state_message(summary)}**", ""]
    stopped = f", stopped early: {train.stop_reason}" if train.stopped_early else ""
    epochs = len(train.history)  # epochs it trained in, the last one possibly cut short by max_steps
    lines.append(f"{train.steps:,}/{train.total_steps:,} steps over {epochs} epoch{'s' if epochs != 1 else ''} in "
                 f"{duration(train.train_seconds)} on {train.device} ({train.samples_per_second:,.0f} samples/s)"
                 f"{stopped}.")
    if cost is not None:
        quote = f"quoted {usd(cost.quote_expected_usd)}" if cost.quote_expected_usd is not None else "not quoted"
        booked = "waiting for the ledger" if summary.settlement_pending else "booked in the ledger"
        lines.append(f"Cost {usd(cost.cost_usd)} ({quote}; {booked}); where it went is in the Artifacts tab, "
                     "`cost_report.md`.")
    if summary.registered:
        lines.append(f"Registered as `{summary.registered.name}` version {summary.registered.version} "
                     f"(alias `{summary.registered.alias}`).")
    if link := prefect_flow_run_url(summary.flow_run_id):
        lines.append(f"Prefect flow run: [{summary.flow_run_name or summary.flow_run_id}]({link}).")
    return "\n".join(lines) + "\n"


def version_description(summary: TrainingSummary) -> str:
    """The registered version's description once its run has settled: what it scored, what it cost, where from."""
    evaluation = summary.evaluation
    source = f" (flow run {summary.flow_run_name})" if summary.flow_run_name else ""
    cost = f"; its run cost {usd(summary.cost.cost_usd)}" if summary.cost else ""
    return (f"{result_phrase(summary)} on {evaluation.samples:,} held-out samples ({evaluation.split} split){cost}; "
            f"trained by Oppen's {summary.workload} flow{source}, MLflow run {summary.mlflow_run_id}.")


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
        f"# {state_message(summary)}",
        "",
        f"{summary.workload} training run, experiment `{summary.experiment}`.",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| result | {result_phrase(summary)} on {evaluation.samples:,} held-out samples ({evaluation.split} split) |",
        *([f"| cost | {headline(summary.cost)}, quoted {usd(summary.cost.quote_expected_usd)} |"] if summary.cost else []),
        f"| steps | {train.steps:,} / {train.total_steps:,} ({stopped}) |",
        f"| epochs completed | {train.epochs_completed} |",
        f"| training time | {duration(train.train_seconds)} on {train.device} ({train.samples_per_second:,.0f} samples/s) |",
        f"| flow duration | {duration(summary.duration_seconds)} |",
        f"| parameters | {train.num_parameters:,} |",
        f"| MLflow run | {run_link} |",
        f"| model | `{summary.model_uri}` |",
        f"| registry | {registered} |",
        "",
    ]
    if train.history:
        names = sorted(train.history[0].metrics)
        lines += ["## Epochs", "", "| epoch | step | train loss | " + " | ".join(n.replace("_", " ") for n in names)
                  + " | time | samples/s |", "|" + " ---: |" * (5 + len(names))]
        for record in train.history:
            values = " | ".join(metric_text(key, record.metrics[key]) for key in names)
            lines.append(f"| {record.epoch} | {record.step:,} | {record.train_loss:.4f} | {values} | "
                         f"{duration(record.epoch_seconds)} | {record.samples_per_second:,.0f} |")
    return "\n".join(lines) + "\n"


def publish_summary(settings: OppenSettings, summary: TrainingSummary) -> TrainingSummary:
    """The summary artifact on the flow run; the run's and the version's descriptions and summary.md in MLflow.

    Called in the flow, not as a task, so Prefect lists the artifact under the flow run. MLflow's part is
    a view of figures the ledger and MLflow already hold: if MLflow is down now, the run still
    completes, with a warning.
    """
    markdown = render_markdown(summary)
    create_markdown_artifact(markdown=markdown, key=artifact_key("summary"),
                             description=f"{state_message(summary)}: {summary.workload} training run summary")
    try:
        client = client_for(settings)
        client.set_tag(summary.mlflow_run_id, DESCRIPTION_TAG, describe(summary))
        client.log_text(summary.mlflow_run_id, markdown, "summary.md")
        if summary.registered and summary.cost:
            client.update_model_version(summary.registered.name, str(summary.registered.version),
                                        description=version_description(summary))
    except Exception as error:
        get_run_logger().warning("MLflow did not take the run's description and summary.md: %s", error)
    return summary
