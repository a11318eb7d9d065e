"""The embedded stack runs the model lifecycle on events: `LocalStack.up()` starts the MLflow webhook
receiver, registers MLflow's webhook and applies the automations, so a version given `development` in
MLflow directly (as a user in its UI would) is promoted to `staging` by promote-model's trigger.
"""

from __future__ import annotations

from tests.prefect_api import prefect_api
from tests.stack import poll_until

import asyncio
import os
import stat
import subprocess
import sys
import time

import pytest

from oppen.local_stack import PROJECT_DIR, LocalStack
from tasks.registry import DIRECTION_TAG, METRIC_TAG, VALUE_TAG

pytestmark = [pytest.mark.slow, pytest.mark.integration]

MODEL = "stack-events"


def _gone(pid: int) -> bool:
    from oppen.local_stack import group_alive

    return not group_alive(pid)


# `python -m oppen.local_stack COMMAND`, on free ports rather than 4200/5000/8765 (a stack of the
# user's, or of another test run, may hold those).
CLI = ("from oppen import local_stack as ls; ls.PREFERRED_PORTS = dict.fromkeys(ls.PREFERRED_PORTS); "
       "ls.main([sys.argv[1]])")


def _cli(stack: LocalStack, command: str) -> str:
    """Run a stack command as a user would (its own process); returns everything it printed."""
    env = dict(os.environ) | {
        "OPPEN_HOME": str(stack.home),
        # `up` deploys the GPU deployments too; no container engine here, so their build step names an image.
        "OPPEN_SKIP_IMAGE_BUILD": "1",
        "OPPEN_IMAGE": "registry.example.com/oppen-train:test",
    }
    for key in ("OPPEN_MLFLOW_WEBHOOK_SECRET", "OPPEN_SLACK_BOT_TOKEN", "OPPEN_SLACK_WEBHOOK_URL",
                "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-c", f"import sys; {CLI}", command], env=env, cwd=PROJECT_DIR,
                            capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = LocalStack(tmp_path_factory.mktemp("local-stack"))
    try:
        yield stack
    finally:
        if stack.state().get("pids"):
            _cli(stack, "down")


@pytest.fixture(scope="module")
def started(stack) -> str:
    """What the first `up` printed."""
    return _cli(stack, "up")


def _prefect(stack: LocalStack, call):
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await call(client)

    with prefect_api(stack.env()["PREFECT_API_URL"]):
        return asyncio.run(run())


def _wait_for(predicate, timeout: float, what: str, stack: LocalStack):
    value = poll_until(predicate, timeout, interval=0.5)
    if value:
        return value
    logs = "\n".join(f"--- {name}.log\n{(stack.logs / f'{name}.log').read_text(errors='replace')[-3000:]}"
                     for name in ("receiver", "worker", "mlflow"))
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def test_up_starts_the_receiver_and_registers_the_webhook(stack, started):
    state = stack.state()
    assert set(state["pids"]) == {"prefect", "mlflow", "worker", "receiver"}
    assert f"MLflow webhook 'oppen-registry' -> {stack.receiver_url()}: created" in started
    assert "applied automations.yaml:" in started
    for name in ("mlflow-webhook-secret", "mlflow-webhook-encryption-key"):
        path = stack.home / "secrets" / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        assert path.read_text().strip() not in started


def test_a_version_given_development_in_mlflow_is_promoted_to_staging(stack, started):
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    uri = stack.env()["OPPEN_MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    # MLflow's server accepts a version's source only inside the artifacts of the run it names.
    run = client.create_run("0")
    client.create_registered_model(MODEL)
    version = client.create_model_version(
        MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
        tags={METRIC_TAG: "test_accuracy", VALUE_TAG: "0.97", DIRECTION_TAG: "true"}).version
    started_at = time.monotonic()
    client.set_registered_model_alias(MODEL, "development", version)

    def promote_runs():
        runs = _prefect(stack, lambda prefect: prefect.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["promote-model"]))))
        return [run for run in runs if run.parameters.get("model_name") == MODEL]

    def finished():
        runs = promote_runs()
        return runs if runs and all(run.state and run.state.is_final() for run in runs) else None

    [promote] = _wait_for(finished, 120, "the trigger's promote-model run to finish", stack)
    assert promote.state.name == "Completed", promote.state.message
    assert int(promote.parameters["version"]) == int(version)
    assert client.get_model_version_by_alias(MODEL, "staging").version == version
    print(f"\nset development -> promote-model Completed and staging set: {time.monotonic() - started_at:.1f} s")
    receiver_log = (stack.logs / "receiver.log").read_text()
    assert "emitted oppen.model.promoted" in receiver_log


def test_a_second_up_leaves_the_webhook_unchanged(stack, started):
    pids = stack.state()["pids"]
    again = _cli(stack, "up")
    assert f"MLflow webhook 'oppen-registry' -> {stack.receiver_url()}: unchanged" in again
    assert [line for line in again.splitlines() if line.startswith(("starting ", "started ", "restarting "))] == []
    assert stack.state()["pids"] == pids


def test_the_secrets_never_appear_in_the_logs(stack, started):
    secrets = [(stack.home / "secrets" / name).read_text().strip()
               for name in ("mlflow-webhook-secret", "mlflow-webhook-encryption-key")]
    logs = {path.name: path.read_bytes().decode(errors="replace") for path in stack.logs.rglob("*") if path.is_file()}
    assert {"prefect.log", "mlflow.log", "worker.log", "receiver.log"} <= set(logs)
    assert [name for name, text in logs.items() if any(secret in text for secret in secrets)] == []
    assert all(secret not in started for secret in secrets)


def test_down_stops_every_process(stack, started):
    pids = stack.state()["pids"]
    out = _cli(stack, "down")
    assert all(f"stopped {name}" in out for name in pids)
    assert [name for name, pid in pids.items() if not _gone(pid)] == []
    assert stack.state()["pids"] == {}
