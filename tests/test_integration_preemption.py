"""Preemption on the local process pool, through a real server and worker: SIGTERM to a flow run's
process mid-epoch (what an eviction, a preemption or a spot reclaim sends a pod) reschedules the
flow run; the next attempt resumes from the last checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import asyncio
import json
import signal
from uuid import UUID

import psutil
import pytest
import torch
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from oppen.cost.ledger import Ledger
from oppen.cost.money import to_micros
from tests.test_integration_local_pool import _deployment_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]

EVERY = 20
RUN = {"epochs": 1, "batch_size": 128, "learning_rate": 5e-3, "max_steps": 160, "checkpoint_every_steps": EVERY,
       "log_every_steps": 10, "num_threads": 1}


def _start(stack, run: dict = RUN, **extra) -> str:
    async def create():
        async with get_client() as client:
            deployment = await client.read_deployment_by_name("train-mnist/local")
            flow_run = await client.create_flow_run_from_deployment(
                deployment.id, parameters={"run": run, "min_test_accuracy": 0.1, **extra}
            )
            return str(flow_run.id)

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        return asyncio.run(create())


def _supervisor_of(flow_run_id: str) -> psutil.Process | None:
    """The `prefect flow-run execute` process of this flow run (the container's main process on Kubernetes)."""
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if "flow-run execute" in cmdline and process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _state_names(stack, flow_run_id: str) -> list[str]:
    async def read():
        async with get_client() as client:
            return [s.name for s in await client.read_flow_run_states(UUID(flow_run_id))]

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        return asyncio.run(read())


def _preempt_mid_epoch(stack, flow_run_id: str, at_least: int = EVERY * 2, steps: int = RUN["max_steps"],
                      below: int | None = None) -> int:
    """SIGTERM to the flow run's process once it checkpointed mid-epoch (at `at_least` or later, before
    `below` when given); returns the checkpoint's step."""
    below = steps - EVERY if below is None else below
    checkpoint = stack.root / "oppen" / "checkpoints" / "mnist" / flow_run_id / "last.pt"

    def mid_epoch_checkpoint():
        if not checkpoint.exists():
            return None
        try:
            step = torch.load(checkpoint, map_location="cpu", weights_only=True)["step"]
        except Exception:  # being replaced right now
            return None
        return step if at_least <= step < below else None

    saved_step = stack.wait_for(mid_epoch_checkpoint, 240, "a mid-epoch checkpoint")
    supervisor = stack.wait_for(lambda: _supervisor_of(flow_run_id), 30, "the flow-run process")
    supervisor.send_signal(signal.SIGTERM)
    return saved_step


def test_sigterm_reschedules_and_the_run_resumes_from_its_checkpoint(stack):
    # The uninterrupted reference.
    result, reference_id = _deployment_run(stack, f"run={json.dumps(RUN)}", "min_test_accuracy=0.1")
    assert "Completed" in result.stdout
    mlflow = MlflowClient(tracking_uri=stack.tracking_uri)
    experiment = mlflow.get_experiment_by_name("mnist")

    def mlflow_run(flow_run_id):
        runs = mlflow.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        assert len(runs) == 1, f"one MLflow run per flow run, found {len(runs)}"
        return runs[0]

    reference = mlflow_run(reference_id)
    assert reference.data.metrics["train/steps_completed"] == RUN["max_steps"]

    flow_run_id = _start(stack)
    saved_step = _preempt_mid_epoch(stack, flow_run_id)
    final = stack.final_state(flow_run_id)
    assert final.is_completed(), f"{final.name}: {final.message}\n{stack.log('worker')}"
    names = _state_names(stack, flow_run_id)
    assert "AwaitingRetry" in names, names  # Prefect's reschedule, not a crash or a retry of a failure
    assert names.count("Running") >= 2, names

    run = mlflow_run(flow_run_id)  # the same MLflow run, reopened
    assert run.info.status == "FINISHED"
    assert run.data.tags["oppen.attempt"] == "2"
    resumed_from = run.data.metrics["train/resumed_from_step"]
    # At most one checkpoint interval lost: the attempt resumed from the last checkpoint written.
    assert resumed_from >= saved_step and resumed_from % EVERY == 0
    assert run.data.metrics["train/steps_completed"] == reference.data.metrics["train/steps_completed"] == RUN["max_steps"]
    assert run.data.metrics["test/accuracy"] > 0.5

    # Both attempts are paid for, in one ledger row that the second attempt reopened and settled.
    ledger = Ledger(f"sqlite:///{stack.root / 'oppen' / 'ledger.db'}")
    try:
        rows = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
        attempts = ledger.attempts_of(flow_run_id)
    finally:
        ledger.dispose()
    assert len(rows) == 1 and rows[0]["status"] == "settled" and rows[0]["attempts"] == 2
    assert [a["status"] for a in attempts] == ["preempted", "settled"] and all(a["cost_micros"] > 0 for a in attempts)
    # MLflow keeps each attempt's part (step = attempt) and the run's total; all three agree to the micro-dollar.
    parts = sorted(mlflow.get_metric_history(run.info.run_id, "cost/attempt_usd"), key=lambda m: m.step)
    assert [to_micros(m.value) for m in parts] == [a["cost_micros"] for a in attempts]
    assert to_micros(run.data.metrics["cost/total_usd"]) == rows[0]["spent_micros"] == sum(a["cost_micros"] for a in attempts)


def test_a_rescheduled_run_with_a_cap_stops_at_the_cap_summed_over_its_attempts(stack):
    """Attempt 2 may spend only what attempt 1 left of the cap: it resumes, then stops at the cap."""
    # Long enough that loading and the tail kept in reserve are a small part of the cost: attempt 2 must find
    # enough of the cap left to load again and end well (else it is refused before loading, rightly), and
    # too little to finish. 400 steps (~4 s of training) left that to where the SIGTERM happened to land.
    run = RUN | {"epochs": 2, "max_steps": 800}
    for _ in range(2):  # the second is quoted from the first's history, as the capped run's attempts will be
        reference_id = _start(stack, run=run)
        reference = stack.final_state(reference_id)
        assert reference.is_completed()
    ledger = Ledger(f"sqlite:///{stack.root / 'oppen' / 'ledger.db'}")
    try:
        [full] = [r["spent_micros"] for r in ledger.rows() if r["run_key"] == reference_id]
        # 90% of what the run costs in one go: enough for attempt 1 to reach the middle with the tail kept in
        # reserve, well short of paying for a second loading and the second half too.
        cap_micros = int(0.9 * full)
        flow_run_id = _start(stack, run=run, cost={"max_cost_usd": cap_micros / 1e6})
        # In the first half: attempt 1 leaves about half the training and 0.4x of it spare in the cap.
        _preempt_mid_epoch(stack, flow_run_id, at_least=run["max_steps"] // 4, steps=run["max_steps"],
                           below=run["max_steps"] // 2)
        final = stack.final_state(flow_run_id)
        assert final.is_completed(), f"{final.name}: {final.message}\n{stack.log('worker')}"
        [row] = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
        first, second = ledger.attempts_of(flow_run_id)
    finally:
        ledger.dispose()
    assert (first["status"], second["status"]) == ("preempted", "stopped")
    # The whole run, both attempts, stays under the one cap; without the carry-over attempt 2 would have had
    # the full cap again, and finished all 800 steps (a second loading and over half the run again).
    assert row["cap_micros"] == cap_micros and row["spent_micros"] == first["cost_micros"] + second["cost_micros"]
    assert row["spent_micros"] <= cap_micros
    mlflow = MlflowClient(tracking_uri=stack.tracking_uri)
    [tracked] = mlflow.search_runs([mlflow.get_experiment_by_name("mnist").experiment_id],
                                   f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert tracked.data.metrics["train/steps_completed"] < run["max_steps"]
    assert to_micros(tracked.data.metrics["cost/total_usd"]) == row["spent_micros"]
    assert tracked.data.metrics["cost/limit_usd"] <= (cap_micros - first["cost_micros"]) / 1e6 + 1e-6
