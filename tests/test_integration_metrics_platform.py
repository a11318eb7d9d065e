"""The platform exporter, as its own process against the `stack` fixture's Prefect server and ledger, scraped
by a real Prometheus through the committed local scrape config: a job held in a paused queue shows up as
a pending run and held money, a cancelled one as a finished run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from oppen.api import cancel_training_job, queue_training_job
from oppen.local_stack import PROJECT_DIR, free_port
from tests.prometheus import PrometheusServer, local_scrape_configs, needs_prometheus, value

pytestmark = [pytest.mark.slow, pytest.mark.integration, needs_prometheus]

TINY = {"epochs": 1, "max_steps": 20, "batch_size": 64}


@pytest.fixture
def platform_exporter(in_process, tmp_path):
    """`python -m oppen.metrics.platform_exporter serve` polling the stack every second; its address."""
    port = free_port()
    log = tmp_path / "platform-exporter.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "oppen.metrics.platform_exporter", "serve", "--port", str(port), "--interval", "1"],
        env=in_process.env, cwd=PROJECT_DIR, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]  # SIGTERM is a clean stop


def test_prometheus_sees_queued_runs_held_budgets_and_finished_runs(in_process, paused_background, platform_exporter,
                                                                      tmp_path):
    job = {"workload": "mnist", "run": TINY | {"seed": 31}, "cost": {"max_cost_usd": 0.5}, "name": "metrics-queued"}
    queued = queue_training_job(job, priority="background")
    assert queued.held_micros > 0
    background = '{job="oppen-exporter", pool="local", queue="background"}'

    with PrometheusServer(tmp_path, local_scrape_configs(exporter=platform_exporter)) as prometheus:
        pending = prometheus.wait_for(f"oppen_queue_pending_runs{background} >= 1")
        assert pending[0]["metric"]["instance"] == platform_exporter
        assert value(prometheus.wait_for(f"oppen_queue_held_usd{background} > 0")[0]) >= queued.held_micros / 1e6
        assert prometheus.wait_for(f"oppen_queue_oldest_wait_seconds{background}")
        assert prometheus.wait_for('oppen_pool_online_workers{pool="local"} >= 1')  # the stack's process worker
        # The default team's budgets hold the queued job's quote, in every budget it answers to.
        held = prometheus.wait_for('oppen_budget_held_usd{team="default"} > 0')
        assert {series["metric"].get("experiment", "") for series in held} >= {""}  # the team-wide budget
        assert {series["metric"]["period"] for series in held} <= {"total", "monthly"}

        cancel_training_job(queued.flow_run_id, "metrics test")
        finished = prometheus.wait_for(
            f'oppen_flow_runs_finished_total{{deployment="{queued.deployment}", state_type="CANCELLED"}} >= 1')
        assert finished[0]["metric"]["state_name"] == "Cancelled"
        assert value(prometheus.wait_for('sum(oppen_exporter_poll_success{job="oppen-exporter"})')[0]) == 4
        # Nothing the platform exporter serves is labelled by a run: its cardinality is the configuration's.
        assert not prometheus.query('count({job="oppen-exporter", flow_run_id!=""})')
