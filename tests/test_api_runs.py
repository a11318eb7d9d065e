"""Experiments, status, cost and registry tools against one tiny MNIST run made through the deployment."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound
from oppen.api.experiments import get_experiment_metrics, list_experiments
from oppen.api.registry import promote_model, register_model
from oppen.api.run_cost import calculate_training_cost
from oppen.api.status import get_training_status
from tests.prefect_api import prefect_api
from tests.stack import poll_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY = {"epochs": 1, "batch_size": 128, "learning_rate": 5e-3, "max_steps": 30}
MODEL = "api-runs-cnn"


@dataclass(frozen=True)
class Trained:
    flow_run_id: str
    mlflow_run_id: str
    queued_status: object  # what get_training_status said right after the run was created


@pytest.fixture(scope="module")
def trained(stack) -> Trained:
    """One run of train-mnist/local, on the worker; the flow itself registers nothing (threshold 1.0)."""
    with pytest.MonkeyPatch.context() as patch:
        for key in ("OPPEN_HOME", "OPPEN_MLFLOW_TRACKING_URI"):
            patch.setenv(key, stack.env[key])
        with prefect_api(stack.api_url):
            with context.prefect() as client:
                deployment = client.read_deployment_by_name("train-mnist/local")
                flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={
                    "run": TINY, "min_test_accuracy": 1.0, "cost": {"max_cost_usd": 0.5}})
            flow_run_id = str(flow_run.id)
            queued_status = get_training_status(flow_run_id)
            state = stack.final_state(flow_run_id, timeout=300)
            assert state.is_completed(), f"{state.name}: {state.message}\n{stack.log('worker')}"
            with context.ledger() as ledger:
                (row,) = [row for row in ledger.rows(experiment="mnist") if row["run_key"] == flow_run_id]
    return Trained(flow_run_id, row["mlflow_run_id"], queued_status)


def test_a_run_just_created_has_a_state_and_no_progress_yet(trained):
    status = trained.queued_status
    assert status.flow_run_id == trained.flow_run_id and status.deployment == "train-mnist/local"
    assert not status.state.final and status.state.type in ("SCHEDULED", "PENDING", "RUNNING")
    assert status.progress.step == 0 and status.forecast.cap_micros == 500_000  # the cap it asked for


def test_list_experiments_shows_the_ledgers_money(trained, in_process):
    (mnist,) = [e for e in list_experiments(name_contains="MNIS") if e.name == "mnist"]
    with context.ledger() as ledger:
        rows = ledger.rows(experiment="mnist")
    assert mnist.runs == len(rows) and mnist.spent_micros == sum(row["spent_micros"] for row in rows) > 0
    assert mnist.spent_usd == mnist.spent_micros / 1e6
    assert mnist.workload == "mnist" and mnist.quality_metric == "test_accuracy" and mnist.higher_is_better
    accuracy = context.mlflow().get_run(trained.mlflow_run_id).data.metrics["test/accuracy"]
    assert mnist.best_value >= accuracy and mnist.best_run_id
    assert mnist.last_run_at is not None
    assert list_experiments(name_contains="no-such-experiment-anywhere") == []
    with pytest.raises(InvalidInput, match="max_results"):
        list_experiments(max_results=0)


def test_get_experiment_metrics_has_the_runs_figures_and_links(trained, in_process):
    metrics = get_experiment_metrics(trained.mlflow_run_id)
    assert metrics.status == "FINISHED" and metrics.experiment == "mnist" and metrics.duration_seconds > 0
    assert metrics.flow_run_id == trained.flow_run_id and metrics.workload == "mnist" and metrics.team == "default"
    assert metrics.params["run.max_steps"] == "30"
    assert {"test/accuracy"} <= set(metrics.metrics.test) and {"val/accuracy"} <= set(metrics.metrics.validation)
    assert {"cost/total_usd", "cost/attempt_usd"} <= set(metrics.metrics.cost)
    assert "train/epoch_loss" in metrics.metrics.train
    assert metrics.params["quote.expected_usd"] and metrics.params["shape.steps_per_epoch"]  # constants are params
    assert metrics.tags["prefect.flow_run_id"] == trained.flow_run_id
    assert metrics.links.prefect and trained.flow_run_id in metrics.links.prefect
    assert get_experiment_metrics(trained.flow_run_id).run_id == trained.mlflow_run_id  # by flow run id too
    with pytest.raises(NotFound):
        get_experiment_metrics(uuid.uuid4().hex)
    with pytest.raises(InvalidInput):
        get_experiment_metrics("not a run")


def test_status_of_the_finished_run(trained, in_process):
    status = get_training_status(trained.flow_run_id, log_lines=50)
    assert status.state.type == "COMPLETED" and status.state.name == "Completed" and status.state.final
    assert status.progress.step == status.progress.total_steps == 30 and status.progress.fraction == 1.0
    assert status.mlflow_run_id == trained.mlflow_run_id and status.experiment == "mnist"
    with context.ledger() as ledger:
        attempts = ledger.attempts_of(trained.flow_run_id)
    assert status.cost.spent_micros == sum(a["cost_micros"] for a in attempts) > 0 and status.cost.held_micros == 0
    assert status.cost.accrued_usd == pytest.approx(status.cost.spent_usd, abs=1e-6)
    assert status.forecast.cap_micros == 500_000 and status.forecast.forecast_usd is not None
    assert status.logs and any("trained 30/30 steps" in line.message for line in status.logs)
    # The run's last lines reach Prefect when its process exits, which can be just after its final state.
    settled = poll_until(lambda: [line for line in get_training_status(trained.flow_run_id, log_lines=50).logs
                                  if line.logger == "prefect.flow_runs.story" and line.message.startswith("settled $")],
                         30)
    assert settled, "the run's story has no settled line"
    assert status.links.prefect and trained.flow_run_id in status.links.prefect
    assert status.summary.startswith("Completed; step 30/30")
    with pytest.raises(NotFound):
        get_training_status(str(uuid.uuid4()))
    with pytest.raises(InvalidInput):
        get_training_status("garbage")


def test_cost_by_flow_run_and_by_mlflow_run_agree_to_the_micro_dollar(trained, in_process):
    by_flow_run = calculate_training_cost(trained.flow_run_id)
    by_mlflow_run = calculate_training_cost(trained.mlflow_run_id)
    assert by_flow_run == by_mlflow_run
    with context.ledger() as ledger:
        (row,) = [row for row in ledger.rows(experiment="mnist") if row["run_key"] == trained.flow_run_id]
    cost = by_flow_run
    assert cost.status == "settled" and cost.spent_micros == row["spent_micros"] > 0 and cost.held_micros == 0
    assert cost.agrees_with_ledger and cost.mlflow_cost_micros == cost.spent_micros
    assert cost.cap_micros == 500_000 and cost.quote_micros == row["quote_micros"]
    assert [a.status for a in cost.attempts] == ["settled"] and cost.attempts[0].cost_micros == cost.spent_micros
    assert sum(charge.amount_micros for charge in cost.charges) == cost.spent_micros
    assert "cost/total_usd" in cost.mlflow_metrics and cost.summary.startswith("settled: $")
    with pytest.raises(NotFound):
        calculate_training_cost(str(uuid.uuid4()))
    with pytest.raises(NotFound):
        calculate_training_cost(uuid.uuid4().hex)
    with pytest.raises(InvalidInput):
        calculate_training_cost("last tuesday's run")


def test_register_then_promote_and_refusals(trained, in_process):
    version = register_model(trained.mlflow_run_id, MODEL)
    assert version.created and version.aliases == ["development"] and version.metric == "test_accuracy"
    assert version.run_id == trained.mlflow_run_id
    again = register_model(trained.flow_run_id, MODEL)  # the same run and name: the same version, not a new one
    assert not again.created and again.version == version.version
    assert [v.version for v in get_experiment_metrics(trained.mlflow_run_id).model_versions] == [version.version]

    # Registering moved `development`, which the prefect.yaml trigger also offers to staging on the worker:
    # whichever comes first promotes it, and staging ends up held by this version either way.
    staging = promote_model(MODEL, "staging")
    assert staging.version == version.version and (staging.promoted or "already holds 'staging'" in staging.reason)
    client = context.mlflow()
    assert int(client.get_model_version_by_alias(MODEL, "staging").version) == version.version
    production = promote_model(MODEL, "production")
    assert production.promoted and production.replaced_version is None
    refused = promote_model(MODEL, "production", version=version.version)
    assert not refused.promoted and "already holds 'production'" in refused.reason

    with pytest.raises(NotFound, match="no registered model"):
        promote_model("no-such-model", "staging")
    with pytest.raises(NotFound, match="no version 99"):
        promote_model(MODEL, "staging", version=99)
    with pytest.raises(InvalidInput):
        promote_model(MODEL, "prod")
    with pytest.raises(InvalidInput):
        register_model(trained.mlflow_run_id, "bad/name")
