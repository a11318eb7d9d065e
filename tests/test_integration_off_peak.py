"""cost.defer_to_off_peak through a real Prefect server: the run reschedules itself to the window, spending nothing."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timezone

import pytest
from prefect.client.orchestration import get_client

import tasks.off_peak
from flows.train_mnist import train_mnist
from oppen.cost.policy import CostPolicy
from tests.test_integration_cost import ledger_charges
from training.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY = RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=12)
# Far in the future, so the deferred run can never come due while the test's worker is polling.
DAYTIME = datetime(2099, 1, 5, 12, 0, tzinfo=timezone.utc)


def _deployment_id(name: str) -> str:
    async def read():
        async with get_client() as client:
            return str((await client.read_deployment_by_name(name)).id)

    return asyncio.run(read())


def test_a_deferred_run_is_rescheduled_to_the_window_with_its_saving_and_costs_nothing(in_process, monkeypatch):
    deployment_id = _deployment_id("train-mnist/local")
    monkeypatch.setattr(tasks.off_peak, "utcnow", lambda: DAYTIME)
    # In-process, a flow run has no deployment; the deferral reschedules the one this run stands for.
    monkeypatch.setattr(tasks.off_peak.deployment, "get_id", lambda: deployment_id)
    state = train_mnist(run=TINY, experiment="deferred", cost=CostPolicy(defer_to_off_peak=True), return_state=True)
    assert state.is_completed() and state.name == "Deferred", f"{state.name}: {state.message}"
    assert "2099-01-05 22:00 UTC (in 10.0 h)" in state.message
    # In dollars once this request has a speed history (earlier tests may have made one), else the discount.
    assert re.search(r"saves \$0\.\d{6} \(50%\)|50% cheaper then", state.message), state.message
    deferral = state.result()

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(deferral.flow_run_id)

    later = asyncio.run(read())
    try:
        assert str(later.deployment_id) == deployment_id and later.state.is_scheduled()
        assert later.state.state_details.scheduled_time == datetime(2099, 1, 5, 22, 0, tzinfo=timezone.utc)
        assert later.parameters["cost"]["defer_to_off_peak"] is True  # at 22:00 it is inside the window: it runs
        assert later.parameters["run"]["max_steps"] == 12 and "oppen-deferred" in later.tags
        assert ledger_charges(in_process, str(state.state_details.flow_run_id)) == []  # nothing held, nothing spent
    finally:
        async def delete():
            async with get_client() as client:
                await client.delete_flow_run(later.id)

        asyncio.run(delete())


def test_deferring_a_run_without_a_deployment_is_a_clear_refusal(in_process, monkeypatch):
    monkeypatch.setattr(tasks.off_peak, "utcnow", lambda: DAYTIME)
    state = train_mnist(run=TINY, experiment="deferred", cost=CostPolicy(defer_to_off_peak=True), return_state=True)
    assert state.name == "InvalidRequest" and "reschedules a deployment run" in state.message
