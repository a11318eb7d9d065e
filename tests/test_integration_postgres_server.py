"""The MNIST deployment end to end on a production-shaped Prefect server: its database in PostgreSQL, its
messaging (events, ordering, leases, Docket) in Redis, the budget ledger in PostgreSQL. Checked where
each piece keeps its record: Prefect's own tables, Redis' event stream, the ledger and MLflow."""

from __future__ import annotations

import json

import pytest
import redis
from mlflow import MlflowClient
from sqlalchemy import create_engine, make_url, text

from oppen.cost.ledger import Ledger
from oppen.cost.money import to_micros
from oppen.tracking_keys import COST_TOTAL
from tests.prefect_backends import production_stack
from tests.stack import poll_until
from tests.test_integration_local_pool import SMALL_RUN, _deployment_run

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory, mnist_dir):
    with production_stack(tmp_path_factory.mktemp("pg-stack"), mnist_dir, redis=True) as stack:
        yield stack


def _prefect_db(stack):
    """The server's own database, read directly (psycopg, as the tests read the ledger)."""
    url = make_url(stack.server_env["PREFECT_API_DATABASE_CONNECTION_URL"]).set(drivername="postgresql+psycopg")
    return create_engine(url)


def test_mnist_deployment_completes_on_postgresql_with_redis_messaging(pg_stack):
    result, flow_run_id = _deployment_run(pg_stack, f"run={json.dumps(SMALL_RUN)}", "min_test_accuracy=0.5")
    assert "Completed" in result.stdout, result.stdout[-2000:]

    # The flow run, its task runs and its logs are rows in PostgreSQL, written by this server.
    engine = _prefect_db(pg_stack)
    try:
        with engine.connect() as conn:
            flow_run = conn.execute(text("SELECT state_type, state_name, run_count FROM flow_run WHERE id = :id"),
                                    {"id": flow_run_id}).one()
            task_runs = conn.execute(text("SELECT count(*) FROM task_run WHERE flow_run_id = :id"),
                                     {"id": flow_run_id}).scalar()
            logs = conn.execute(text("SELECT count(*) FROM log WHERE flow_run_id = :id"), {"id": flow_run_id}).scalar()
            version = conn.execute(text("SELECT version()")).scalar()

        # Events reach the `events` table only through the messaging broker (the event persister consumes them
        # from Redis here, and writes in batches): the run's Completed event in PostgreSQL is the round trip.
        def completed_event():
            with engine.connect() as conn:
                return conn.execute(text("SELECT count(*) FROM events WHERE event = 'prefect.flow-run.Completed' "
                                         "AND resource_id = :rid"), {"rid": f"prefect.flow-run.{flow_run_id}"}).scalar()

        completed_events = poll_until(completed_event, 60, interval=1)
        if not completed_events:
            with engine.connect() as conn:
                persisted = conn.execute(text("SELECT event, count(*) FROM events GROUP BY event")).all()
            pytest.fail(f"no Completed event persisted; the events table holds {persisted}\n{pg_stack.log('server')}")
    finally:
        engine.dispose()
    print(f"flow run {flow_run_id} in {version.split(',')[0]}: {tuple(flow_run)}, {task_runs} task runs, "
          f"{logs} log lines, {completed_events} Completed event(s)")
    assert tuple(flow_run) == ("COMPLETED", "Completed", 1)
    assert task_runs > 0 and logs > 0
    assert completed_events == 1

    # The events went through Redis: its `events` stream exists, with the server's consumer groups on it.
    client = redis.Redis.from_url(pg_stack.server_env["PREFECT_REDIS_MESSAGING_URL"], decode_responses=True)
    try:
        groups = {group["name"] for group in client.xinfo_groups("events")}
    finally:
        client.close()
    assert "event-persister" in groups, groups

    # MLflow's run and the ledger's one settlement agree to the micro-dollar.
    mlflow = MlflowClient(tracking_uri=pg_stack.tracking_uri)
    [run] = mlflow.search_runs([mlflow.get_experiment_by_name("mnist").experiment_id],
                               f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    ledger = Ledger(pg_stack.env["OPPEN_LEDGER_URL"])
    try:
        [row] = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
        attempts = ledger.attempts_of(flow_run_id)
    finally:
        ledger.dispose()
    print(f"ledger: {row['status']}, spent {row['spent_micros']} micro-USD in {row['attempts']} attempt(s); "
          f"MLflow {COST_TOTAL} {run.data.metrics[COST_TOTAL]}")
    assert run.info.status == "FINISHED" and run.data.metrics["test/accuracy"] > 0.5
    assert row["status"] == "settled" and row["attempts"] == 1 and row["spent_micros"] > 0
    assert [a["status"] for a in attempts] == ["settled"]
    assert to_micros(run.data.metrics[COST_TOTAL]) == row["spent_micros"] == attempts[0]["cost_micros"]
