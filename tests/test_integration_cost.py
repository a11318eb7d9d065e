"""The cost engine through a real Prefect server and process worker: refuse, cap, settle, report, recommend."""

from __future__ import annotations

import asyncio
import json
import re
from uuid import UUID

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_API_URL, temporary_settings

from oppen.cost.budgets import open_ledger
from oppen.cost.money import format_usd, to_micros
from tests.test_integration_local_pool import _deployment_run, _read_flow_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# One epoch (214 steps) and part of a second: a forecast after epoch 1, two epoch ends, room for a mid-run cap.
COST_RUN = {"epochs": 2, "batch_size": 256, "learning_rate": 8e-3, "max_steps": 300, "log_every_steps": 50}


@pytest.fixture(scope="module")
def settled(stack):
    """One normal metered run, shared by the checks below (the capped run is priced from it)."""
    result, flow_run_id = _deployment_run(stack, f"run={json.dumps(COST_RUN)}", "min_test_accuracy=0.5",
                                          'cost={"team": "default"}')
    assert "Completed" in result.stdout
    return flow_run_id, _mlflow_run(stack, flow_run_id)


def _ledger(stack):
    return open_ledger(f"sqlite:///{stack.root / 'oppen' / 'ledger.db'}")


def _mlflow_runs(stack, flow_run_id: str):
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.`prefect.flow_run_id` = '{flow_run_id}'")


def _mlflow_run(stack, flow_run_id: str):
    runs = _mlflow_runs(stack, flow_run_id)
    assert len(runs) == 1
    return runs[0]


def ledger_charges(stack, flow_run_id: str) -> list[dict]:
    ledger = _ledger(stack)
    try:
        return ledger.charges_of(flow_run_id)
    finally:
        ledger.dispose()


def _artifacts(stack, flow_run_id: str):
    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        return asyncio.run(read())


def test_settled_run_agrees_in_ledger_mlflow_and_artifact(stack, settled):
    flow_run_id, run = settled
    ledger = _ledger(stack)
    [row] = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
    ledger.dispose()
    metrics = run.data.metrics
    assert row["status"] == "settled" and row["held_micros"] == 0 and row["mlflow_run_id"] == run.info.run_id
    # One figure everywhere, to the micro-dollar: the ledger's integer, MLflow, both artifacts, the state.
    assert row["spent_micros"] == to_micros(metrics["cost/total_usd"]) == to_micros(metrics["cost/attempt_usd"]) > 0
    amount = format_usd(row["spent_micros"])
    artifacts = {a.key: a for a in _artifacts(stack, flow_run_id)}
    # Keyed per deployment and kind, so each run adds a version under four stable keys; the amount leads.
    assert {"train-mnist-local-cost", "train-mnist-local-cost-table", "train-mnist-local-summary",
            "train-mnist-local-progress"} <= set(artifacts)
    report = artifacts["train-mnist-local-cost"]
    assert report.data.startswith(f"# {amount} for ") and "booked in the ledger" in report.data
    assert report.description.startswith(amount)
    rows = {item["figure"]: item["value"] for item in json.loads(artifacts["train-mnist-local-cost-table"].data)}
    assert rows["Cost of the run"].startswith(f"{amount}, completed")
    assert _read_flow_run(stack, flow_run_id).state.message.startswith(f"{amount} · test accuracy ")
    client = MlflowClient(tracking_uri=stack.tracking_uri)
    # MLflow has the same: the description leads with the amount, the report and the summary are run artifacts.
    assert run.data.tags["mlflow.note.content"].startswith(f"**{amount} · test accuracy ")
    assert {"cost_report.md", "summary.md", "config.json"} <= {f.path for f in client.list_artifacts(run.info.run_id)}
    [charge] = ledger_charges(stack, flow_run_id)
    assert charge["amount_micros"] == row["spent_micros"] and charge["kind"] == "usage"
    # The engine's other outputs are there, each in its section: per-epoch cost and forecast, hours,
    # utilisation, speed; the quote and the rates are params (constants of the run, not step-0 metrics).
    for key in ("cost/forecast_error", "cost/cpu_core_hours", "cost/gpu_hours", "cost/per_point_usd",
                "utilization/cpu_cores_mean", "speed/seconds_per_sample", "speed/tail_seconds"):
        assert key in metrics, key
    assert not [key for key in metrics if "/" not in key]  # every metric is grouped
    assert not [key for key in metrics if key.startswith("quote")]
    for param in ("quote.expected_usd", "quote.p90_usd", "quote.cheapest_start", "rate.hourly_usd",
                  "rate.off_peak_discount", "shape.steps_per_epoch"):
        assert param in run.data.params, param
    # Each epoch's own cost, adding up with the run's cost before training to the accrued total at its end.
    epochs = sorted(client.get_metric_history(run.info.run_id, "cost/epoch_usd"), key=lambda m: m.step)
    accrued = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "cost/accrued_usd")}
    assert len(epochs) == 2
    assert accrued[epochs[1].step] - accrued[epochs[0].step] == pytest.approx(epochs[1].value, abs=2e-9)  # nano-dollars
    # Accrued cost through the whole run: ten points an epoch, not only in the first.
    second_epoch = [step for step in accrued if epochs[0].step < step <= epochs[1].step]
    assert len(second_epoch) >= 5, sorted(accrued)
    assert len(client.get_metric_history(run.info.run_id, "cost/forecast_usd")) >= 10
    assert abs(metrics["cost/forecast_error"]) < 0.5  # sanity only: accuracy is measured in bench/
    # MLflow's own system-metrics monitor ran beside training.
    assert [key for key in metrics if key.startswith("system/")], sorted(metrics)


def test_run_over_budget_is_refused_before_training_and_recorded(stack, settled):
    ledger = _ledger(stack)
    ledger.upsert_team("tiny")
    ledger.set_budget("tiny", 0.000001, "monthly")
    ledger.dispose()
    # The same request as the settled run, so its history quotes it before a byte of data is read.
    result, flow_run_id = _deployment_run(stack, f"run={json.dumps(COST_RUN)}", 'cost={"team": "tiny"}', check=False)
    flow_run = _read_flow_run(stack, flow_run_id)
    assert flow_run.state.is_failed() and flow_run.state.name == "OverBudget"
    assert "refused before loading" in flow_run.state.message and "team tiny" in flow_run.state.message
    assert _mlflow_runs(stack, flow_run_id) == []  # no MLflow run for a request that never ran
    ledger = _ledger(stack)
    [row] = [r for r in ledger.rows(team="tiny") if r["run_key"] == flow_run_id]
    [attempt] = ledger.attempts_of(flow_run_id)
    ledger.dispose()
    assert row["status"] == "refused" and row["held_micros"] == row["spent_micros"] == 0
    assert attempt["status"] == "refused" and "over budget" in attempt["reason"]
    assert not (stack.root / "oppen" / "checkpoints" / "mnist" / flow_run_id).exists()  # no training step


def test_unknown_team_fails_before_anything_is_spent(stack):
    result, flow_run_id = _deployment_run(stack, 'cost={"team": "no-such-team"}', check=False)
    flow_run = _read_flow_run(stack, flow_run_id)
    assert flow_run.state.name == "InvalidRequest" and "unknown team 'no-such-team'" in flow_run.state.message
    assert _mlflow_runs(stack, flow_run_id) == []  # refused before even the MLflow run was opened


def test_capped_run_stops_mid_run_with_a_checkpoint_within_one_step_of_its_cap(stack, settled):
    _, normal = settled
    cap = 0.5 * normal.data.metrics["cost/total_usd"]
    result, flow_run_id = _deployment_run(stack, f"run={json.dumps(COST_RUN)}", "min_test_accuracy=0.0",
                                          f'cost={{"max_cost_usd": {cap!r}}}')
    assert "Completed" in result.stdout
    tracked = _mlflow_run(stack, flow_run_id)
    metrics = tracked.data.metrics
    assert float(tracked.data.params["cost.max_cost_usd"]) == pytest.approx(cap) and metrics["cost/limit_usd"] <= cap
    # The guarantee: training stops one step before the step that would leave too little for the tail.
    assert metrics["cost/at_training_end_usd"] + metrics["cost/tail_reserve_usd"] <= cap
    # And the settled total lands under the cap: the tail reserve is deliberately generous (1.5x + 1 s).
    assert 0.5 * cap <= metrics["cost/total_usd"] <= cap
    # The flow run's own output reaches the worker's log on its own schedule (a loaded machine: seconds later).
    stack.wait_for(lambda: "budget cap" in stack.log("worker"), 60, "the cap's log line in the worker log")
    ledger = _ledger(stack)
    [row] = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
    ledger.dispose()
    assert row["status"] == "stopped" and row["spent_micros"] == to_micros(metrics["cost/total_usd"])
    state = _read_flow_run(stack, flow_run_id).state
    assert state.message.startswith(f"{format_usd(row['spent_micros'])} of ") and ", stopped at its cap · " in state.message
    checkpoint = stack.root / "oppen" / "checkpoints" / "mnist" / flow_run_id / "last.pt"
    assert checkpoint.exists()
    import torch

    saved = torch.load(checkpoint, weights_only=True)  # checkpoints hold only tensors and plain values
    assert 0 < saved["step"] < 300 and saved["reason"].startswith("stopped: budget cap")


def test_cost_report_and_recommendations_flows(stack, settled):
    flow_run_id, run = settled
    report = stack.prefect("deployment", "run", "cost-report/local", "--watch", "--watch-timeout", "120",
                           "--param", 'request={"team": "default"}', check=False)
    assert "Completed" in report.stdout, report.stdout[-2000:] + stack.log("worker")
    csvs = list((stack.root / "oppen" / "reports").glob("cost-default-*.csv"))
    assert csvs and run.info.run_id in csvs[0].read_text()
    savings = stack.prefect("deployment", "run", "recommend-savings/local", "--watch", "--watch-timeout", "120",
                            "--param", f"run_id={run.info.run_id}", check=False)
    assert "Completed" in savings.stdout, savings.stdout[-2000:]
    run_uuid = re.search(r"UUID:\s*([0-9a-f-]{36})", savings.stdout).group(1)
    [artifact] = [a for a in _artifacts(stack, run_uuid) if a.key == "savings"]
    assert "| off_peak |" in artifact.data or "| spot |" in artifact.data
