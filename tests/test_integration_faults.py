"""Faults through a real Prefect server and process worker: the ledger down at settle, MLflow down mid-run.

The ledger runs on this machine's PostgreSQL behind a TCP proxy the test cuts; MLflow is a real
`mlflow server` the test kills and restarts. Each flow run gets its URLs through the local pool's
`env` job variable, as a deployment on another cluster would through its runtime config.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from urllib.parse import urlsplit

import pytest
from mlflow import MlflowClient

from oppen.cost.ledger import Ledger
from oppen.cost.money import to_micros
from oppen.local_stack import free_port, wait_http
from tests.postgres import postgres_base, postgres_schema
from tests.stack import BIN
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Long enough to cut a dependency mid-training and bring it back: ~10-20 s of training on one thread.
RUN = {"epochs": 1, "batch_size": 128, "learning_rate": 5e-3, "max_steps": 400, "log_every_steps": 10, "num_threads": 1}


def _start(stack, env: dict[str, str], run: dict = RUN) -> str:
    result = stack.prefect("deployment", "run", "train-mnist/local", "--param", f"run={json.dumps(run)}",
                           "--param", "min_test_accuracy=0.5", "--job-variable", f"env={json.dumps(env)}")
    return re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout).group(1)


@pytest.fixture
def proxied_ledger():
    """A fresh schema on the test PostgreSQL, reachable directly and through a proxy the test can cut."""
    base = postgres_base("the ledger-outage test")
    parts = urlsplit(base)
    proxy = TcpProxy(parts.hostname, parts.port or 5432).up()
    try:
        with postgres_schema(base, prefix="oppen_fault") as direct:
            yield direct, direct.replace(f"{parts.hostname}:{parts.port or 5432}", f"127.0.0.1:{proxy.port}"), proxy
    finally:
        proxy.down()


def test_ledger_down_at_settle_is_journalled_then_reconciled_exactly_once(stack, proxied_ledger):
    direct, via_proxy, proxy = proxied_ledger
    flow_run_id = _start(stack, {"OPPEN_LEDGER_URL": via_proxy})
    ledger = Ledger(direct)

    def holding():
        try:
            return [a for a in ledger.attempts_of(flow_run_id) if a["status"] == "running"]
        except Exception:  # the schema is created by the flow run itself
            return None

    [attempt] = stack.wait_for(holding, 240, "the run's reservation")
    proxy.down()  # the ledger is unreachable from here to the end of the run
    state = stack.final_state(flow_run_id)

    # The run completed, and its state says the money is not booked yet and why.
    assert state.is_completed() and state.name == "SettlementPending", f"{state.name}: {state.message}"
    assert "ledger could not be reached" in state.message and "oppen ledger reconcile" in state.message
    assert ledger.attempt(attempt["id"])["status"] == "running"  # still only held: nothing booked twice
    journal = stack.root / "oppen" / "checkpoints" / ".settlements"
    [entry_file] = list(journal.glob("*.json"))
    entry = json.loads(entry_file.read_text())
    assert entry["attempt_id"] == attempt["id"] and entry["status"] == "settled"
    mlflow = MlflowClient(tracking_uri=stack.tracking_uri)
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("mnist").experiment_id],
                               f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert run.data.tags["oppen.settlement"] == "pending"
    assert to_micros(run.data.metrics["cost/attempt_usd"]) == sum(entry["charges_by_month"].values())

    proxy.up()
    env = {"OPPEN_LEDGER_URL": direct}
    first = stack.run(str(BIN / "oppen"), "reconcile", check=False, env_extra=env)
    assert first.returncode == 0 and first.stdout.startswith("booked"), first.stdout + first.stderr
    again = stack.run(str(BIN / "oppen"), "reconcile", check=False, env_extra=env)
    assert again.returncode == 0 and "nothing to reconcile" in again.stdout
    booked = ledger.attempt(attempt["id"])
    [row] = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
    assert booked["status"] == "settled" and booked["held_micros"] == 0
    assert row["spent_micros"] == booked["cost_micros"] == sum(entry["charges_by_month"].values())
    assert not entry_file.exists()
    ledger.dispose()


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on SQLite that the test can kill and start again on the same port and store."""
    port = free_port()
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination", str(tmp_path / "artifacts")]
    processes: list[subprocess.Popen] = []

    def start() -> None:
        log = open(tmp_path / "mlflow.log", "ab")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        wait_http(f"http://127.0.0.1:{port}/health", 120, process, tmp_path / "mlflow.log")

    def kill() -> None:
        os.killpg(processes[-1].pid, signal.SIGKILL)
        processes[-1].wait(10)

    start()
    yield f"http://127.0.0.1:{port}", start, kill
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_mlflow_down_during_training_loses_no_metric_and_no_money(stack, mlflow_server):
    uri, start, kill = mlflow_server
    flow_run_id = _start(stack, {"OPPEN_MLFLOW_TRACKING_URI": uri})
    client = MlflowClient(tracking_uri=uri)

    def training():
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            return runs[0].info.run_id
        return None

    run_id = stack.wait_for(training, 240, "training to log its first metrics")
    kill()
    down_from = time.time() * 1000
    time.sleep(6)  # training goes on; its metrics wait in the sink (and in MLflow's own HTTP retries)
    start()
    down_until = time.time() * 1000
    state = stack.final_state(flow_run_id)
    assert state.is_completed(), f"{state.name}: {state.message}\n{stack.log('worker')}"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "oppen.metrics_gap" not in run.data.tags
    steps = run.data.metrics["train/steps_completed"]
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(10, int(steps) + 1, 10))  # every point, once
    assert any(down_from < m.timestamp < down_until for m in history)  # some were made while MLflow was down
    assert "val/accuracy" in run.data.metrics and "test/accuracy" in run.data.metrics
    ledger = Ledger(f"sqlite:///{stack.root / 'oppen' / 'ledger.db'}")
    try:
        [row] = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
    finally:
        ledger.dispose()
    assert row["status"] == "settled" and row["spent_micros"] == to_micros(run.data.metrics["cost/total_usd"]) > 0
