"""Flows called in-process against the real test server: failures, the LM flow, promotion."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

import tasks.training_tasks
from flows.promote_model import PromotionRefused, promote_model
from flows.train_lm import train_lm
from flows.train_mnist import train_mnist
from oppen.settings import load_settings
from tasks.registry import register_version
from tasks.tracking import client_for, ensure_experiment, log_torch_model
from training.config import RunConfig
from training.lm.workload import LmConfig
from training.mnist.models import FastCNN

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_a_failure_after_training_closes_the_run_failed_and_keeps_its_metrics(in_process, monkeypatch):
    def broken_store(*args, **kwargs):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(tasks.training_tasks, "log_torch_model", broken_store)
    with pytest.raises(OSError, match="artifact store unreachable"):
        train_mnist(run=RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=12), experiment="failing")
    client = MlflowClient(in_process.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert run.info.status == "FAILED"
    assert {"val/accuracy", "train/epoch_loss", "test/accuracy"} <= set(run.data.metrics)
    assert run.data.params["run.max_steps"] == "12"


def test_lm_flow_trains_offline_and_registers(in_process, wikitext_dir):
    summary = train_lm(
        config=LmConfig(data_dir=wikitext_dir, block_size=64, vocab_size=512, n_layer=1, n_head=2, n_embd=64,
                        max_train_tokens=30_000, max_eval_tokens=4096),
        run=RunConfig(epochs=1, batch_size=16, learning_rate=3e-3, max_steps=15),
        max_perplexity=5000.0,
    )
    assert summary.evaluation.primary_metric == "eval_perplexity"
    assert summary.registered is not None and summary.registered.alias == "development"
    run = MlflowClient(in_process.tracking_uri).get_run(summary.mlflow_run_id)
    assert run.data.params["config.data_dir"] == str(wikitext_dir)
    assert run.data.metrics["eval/perplexity"] == pytest.approx(summary.evaluation.primary_value)


def test_a_retried_final_state_still_returns_the_summary(in_process, monkeypatch):
    """The reply to the Completed state is lost and the client sends it again (as Prefect's client does on a
    timeout or a dropped connection): the server rejects the duplicate and returns its own copy of the state."""
    from prefect.client.orchestration.base import BaseClient

    send_once = BaseClient.request
    resent = []

    def send_final_state_twice(self, method, path, params=None, path_params=None, **kwargs):
        response = send_once(self, method, path, params, path_params, **kwargs)
        if path.endswith("/set_state") and kwargs.get("json", {}).get("state", {}).get("type") == "COMPLETED":
            resent.append(response.json()["status"])
            response = send_once(self, method, path, params, path_params, **kwargs)
            resent.append(response.json()["status"])
        return response

    monkeypatch.setattr(BaseClient, "request", send_final_state_twice)
    summary = train_mnist(run=RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=4),
                          experiment="retried-final-state", min_test_accuracy=0.0)
    assert resent == ["ACCEPT", "REJECT"]  # the duplicate really was refused, and the server's copy came back
    assert summary.train.steps == 4 and summary.cost is not None


def _register(name: str, accuracy: float) -> int:
    settings = load_settings()
    client = client_for(settings)
    experiment_id = ensure_experiment(client, "promotion", settings.artifact_root)
    run_id = client.create_run(experiment_id).info.run_id
    uri = log_torch_model(settings, run_id, FastCNN(), torch.zeros(1, 1, 28, 28).numpy(), "model")
    return register_version(settings, name, uri, "test_accuracy", accuracy, True, "development").version


def test_promotion_moves_along_and_refuses_a_worse_replacement(in_process):
    good = _register("promo-cnn", 0.991)
    result = promote_model(model_name="promo-cnn", target="staging")
    assert result.promoted and result.version == good
    assert promote_model(model_name="promo-cnn", target="production").promoted

    worse = _register("promo-cnn", 0.985)  # now holds development
    promote_model(model_name="promo-cnn", target="staging", force=True)  # staging may be forced...
    with pytest.raises(PromotionRefused, match=r"version 1 \(test_accuracy 0.9910\) holds 'production' and scores better"):
        promote_model(model_name="promo-cnn", target="production")
    client = MlflowClient(in_process.tracking_uri)
    assert int(client.get_model_version_by_alias("promo-cnn", "production").version) == good
    # The event-driven path offers every new version: a worse one ends NotPromoted, a completed run, not a failure.
    offered = promote_model(model_name="promo-cnn", target="production", version=worse, only_if_better=True,
                            return_state=True)
    assert offered.is_completed() and offered.name == "NotPromoted" and "scores better" in offered.message
    forced = promote_model(model_name="promo-cnn", target="production", force=True)
    assert forced.promoted and forced.replaced_version == good
    assert int(client.get_model_version_by_alias("promo-cnn", "production").version) == worse


def test_an_unreachable_ledger_stops_the_run_before_anything_is_spent(in_process, monkeypatch):
    from tests.ledger_stress_worker import closed_port_uri

    closed = closed_port_uri().replace("http://", "postgresql+psycopg://postgres@") + "/test"
    monkeypatch.setenv("OPPEN_LEDGER_URL", closed)
    state = train_mnist(run=RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=12),
                        experiment="no-ledger", return_state=True)
    assert state.is_failed() and state.name == "LedgerUnavailable", f"{state.name}: {state.message}"
    assert "cannot be reached" in state.message and "Traceback" not in state.message
    assert MlflowClient(in_process.tracking_uri).get_experiment_by_name("no-ledger") is None  # nothing was opened


def test_a_version_the_flow_registers_is_offered_to_staging_by_the_deployment_trigger(in_process):
    """training → `development` → the prefect.yaml trigger runs promote-model/local on the worker → `staging`."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

    summary = train_mnist(run=RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=12),
                          experiment="lifecycle", model_name="trigger-cnn", min_test_accuracy=0.0)
    version = summary.registered.version

    async def promotions():
        async with get_client() as client:
            runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["local"])), flow_run_filter=FlowRunFilter())
            return [run for run in runs if run.parameters.get("model_name") == "trigger-cnn"]

    def finished():
        runs = asyncio.run(promotions())
        return runs if runs and all(run.state.is_final() for run in runs) else None

    (run,) = in_process.wait_for(finished, 180, "the trigger's promote-model run to finish")
    assert run.state.is_completed() and run.parameters["version"] == version, run.state
    assert run.parameters["target"] == "staging" and run.parameters["only_if_better"] is True
    holder = MlflowClient(in_process.tracking_uri).get_model_version_by_alias("trigger-cnn", "staging")
    assert int(holder.version) == version
