"""Shared fixtures. Data is found through the same variables a user sets (scripts/test.sh sets them)."""

from __future__ import annotations

from tests.prefect_api import prefect_api

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _data_dir(var: str, fallback: Path) -> Path:
    path = Path(os.environ.get(var) or fallback)
    if not path.is_dir():
        pytest.skip(f"{var} is not set and {fallback} does not exist")
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return _data_dir("OPPEN_MNIST_DIR", SHARED / "mnist")


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    return _data_dir("OPPEN_WIKITEXT_DIR", SHARED / "wikitext-2")


@pytest.fixture(scope="session")
def mnist_arrays(mnist_dir):
    from training.mnist.data import load_mnist

    return load_mnist(mnist_dir)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, mnist_dir):
    """A real Prefect server with the pools applied, prefect.yaml deployed and a process worker."""
    import sys

    from tests.stack import PrefectStack

    stack = PrefectStack(tmp_path_factory.mktemp("stack"))
    stack.env["OPPEN_MNIST_DIR"] = str(mnist_dir)
    try:
        stack.start_server()
        stack.run(sys.executable, "-m", "work_pools.apply")
        stack.prefect("--no-prompt", "deploy", "--all")
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def in_process(stack, monkeypatch):
    """Flows called in this process talk to the test server and its MLflow store."""

    for key in ("OPPEN_HOME", "OPPEN_MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, stack.env[key])
    with prefect_api(stack.api_url):
        yield stack


@pytest.fixture
def shoestring_team(in_process):
    """A team whose whole budget is one micro-dollar: every job of it is over budget, history or not."""
    from oppen.api import context
    from oppen.cost.budgets import BudgetsFile, apply_budgets

    with context.ledger() as ledger:
        apply_budgets(ledger, BudgetsFile.model_validate({"teams": {"shoestring": {
            "budget": {"amount_usd": 0.000001, "period": "monthly"}}}}))
    return "shoestring"


@pytest.fixture
def paused_background(in_process):
    """The local pool's background queue, paused: what is queued there waits (resumed afterwards)."""
    from oppen.api import context

    with context.prefect() as client:
        queue = client.read_work_queue_by_name("background", work_pool_name="local")
        client.update_work_queue(queue.id, is_paused=True)
        try:
            yield queue
        finally:
            client.update_work_queue(queue.id, is_paused=False)
