"""MLflow registry webhooks end to end: a real `mlflow server` (SQLite) delivers signed webhooks to the
receiver, which emits Oppen's events to a real Prefect server, whose deployment trigger runs promote-model.
"""

from __future__ import annotations

from tests.prefect_api import prefect_api

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone

import httpx
import pytest

from oppen.events import MODEL_PROMOTED, MODEL_REGISTERED, model_event_id
from oppen.local_stack import PROJECT_DIR, free_port, wait_http
from tasks.registry import DIRECTION_TAG, METRIC_TAG, VALUE_TAG
from tests.stack import BIN, PrefectStack

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SECRET = "it-" + os.urandom(16).hex()
# What an MLflow server needs to deliver to a receiver on this machine over plain http (see the README).
MLFLOW_WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",  # the default 60 s would hide a webhook registered after the first event
}


def spawn(stack: PrefectStack, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Like stack.spawn, with an environment of its own; stack.stop() still stops it."""
    log = open(stack.root / f"{name}.log", "ab")
    process = subprocess.Popen(argv, env=env, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    stack.processes.append(process)
    return process


class Lifecycle:
    """The stack under test and the questions the tests ask it."""

    def __init__(self, stack: PrefectStack, mlflow_uri: str, receiver_url: str) -> None:
        self.stack, self.mlflow_uri, self.receiver_url = stack, mlflow_uri, receiver_url

    def mlflow(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow_uri, registry_uri=self.mlflow_uri)

    def prefect(self, call):
        from prefect.client.orchestration import get_client

        async def run():
            async with get_client() as client:
                return await call(client)

        with prefect_api(self.stack.api_url):
            return asyncio.run(run())

    def events(self, name: str, model: str) -> list:
        from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

        event_filter = EventFilter(event=EventNameFilter(name=[name]),
                                   resource=EventResourceFilter(id=[f"oppen.model.{model}"]))
        # limit: the client defaults to 100, which this server version refuses (at most 50).
        return self.prefect(lambda client: client.read_events(filter=event_filter, limit=50)).events

    def wait_event(self, name: str, model: str, alias: str | None = None):
        def found():
            return next((event for event in self.events(name, model)
                         if event.resource.get("oppen.model.alias") == alias), None)

        return self.stack.wait_for(found, 60, f"{name} for {model} (alias {alias}); receiver log:\n"
                                   f"{self.stack.log('receiver')}\nmlflow log:\n{self.stack.log('mlflow')}")

    def failed_actions(self) -> list[str]:
        from prefect.events.filters import EventFilter, EventNameFilter

        event_filter = EventFilter(event=EventNameFilter(name=["prefect.automation.action.failed"]))
        events = self.prefect(lambda client: client.read_events(filter=event_filter, limit=50)).events
        return [event.payload.get("reason", "") for event in events]

    def promote_runs(self, model: str) -> list:
        from prefect.client.schemas.filters import FlowFilter, FlowFilterName

        runs = self.prefect(lambda client: client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["promote-model"]))))
        return [run for run in runs if run.parameters.get("model_name") == model]

    def register_version(self, model: str, tags: dict[str, str] | None = None) -> tuple[int, str, float]:
        """A version made directly through MLflow's API (as a user in the UI would), then `development`."""
        client = self.mlflow()
        # MLflow's server accepts a version's source only inside the artifacts of the run it names.
        run = client.create_run("0")
        client.create_registered_model(model)
        version = client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                              tags=tags).version
        started = time.time()
        client.set_registered_model_alias(model, "development", version)
        return int(version), run.info.run_id, started


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    from cryptography.fernet import Fernet
    from prefect.blocks.system import Secret

    from oppen.mlflow_webhook_receiver import SECRET_BLOCK

    stack = PrefectStack(tmp_path_factory.mktemp("webhooks"))
    mlflow_port, receiver_port = free_port(), free_port()
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    stack.env.pop("OPPEN_MLFLOW_WEBHOOK_SECRET", None)
    stack.env.update(OPPEN_MLFLOW_TRACKING_URI=mlflow_uri, MLFLOW_TRACKING_URI=mlflow_uri,
                     # Events reach the database within half a second, so reading them back waits less.
                     PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL="0.5")
    mlflow_env = stack.env | MLFLOW_WEBHOOK_ENV | {
        # Stored webhook secrets are encrypted with this key; without it each server process makes its own.
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    try:
        mlflow = spawn(stack, "mlflow", [
            str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
            "--backend-store-uri", f"sqlite:///{stack.root / 'mlflow.db'}",
            "--artifacts-destination", str(stack.root / "mlartifacts"), "--workers", "1"], mlflow_env)
        stack.start_server()
        wait_http(f"{mlflow_uri}/health", 120, mlflow, stack.root / "mlflow.log")
        # The receiver reads its secret from the Prefect Secret block; `register` from the setting.
        with prefect_api(stack.api_url):
            Secret(value=SECRET).save(SECRET_BLOCK)
        receiver = spawn(stack, "receiver", [sys.executable, "-m", "oppen.mlflow_webhook_receiver", "serve",
                                             "--port", str(receiver_port)], stack.env)
        wait_http(f"http://127.0.0.1:{receiver_port}/healthz", 60, receiver, stack.root / "receiver.log")
        receiver_url = f"http://127.0.0.1:{receiver_port}/mlflow-webhook"
        registered = stack.run(sys.executable, "-m", "oppen.mlflow_webhook_receiver", "register", "--url",
                               receiver_url, env_extra={"OPPEN_MLFLOW_WEBHOOK_SECRET": SECRET})
        assert registered.stdout.strip() == "created", registered.stderr
        yield Lifecycle(stack, mlflow_uri, receiver_url)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def deployed(lifecycle):
    """prefect.yaml deployed (with promote-model's trigger) and a process worker."""
    lifecycle.stack.run(sys.executable, "-m", "work_pools.apply")
    lifecycle.stack.prefect("--no-prompt", "deploy", "--all")
    lifecycle.stack.start_worker()
    return lifecycle


def test_register_is_idempotent(lifecycle):
    from pydantic import SecretStr

    from oppen.mlflow_webhook_receiver import register_webhook

    again = lifecycle.stack.run(sys.executable, "-m", "oppen.mlflow_webhook_receiver", "register", "--url",
                                lifecycle.receiver_url, env_extra={"OPPEN_MLFLOW_WEBHOOK_SECRET": SECRET})
    assert again.stdout.strip() == "unchanged"
    client, secret = lifecycle.mlflow(), SecretStr(SECRET)
    # A second webhook, to see updates without disturbing the one the other tests use.
    assert register_webhook(client, "http://127.0.0.1:9/probe", "oppen-probe", secret) == "created"
    try:
        assert register_webhook(client, "http://127.0.0.1:9/probe", "oppen-probe", secret) == "unchanged"
        assert register_webhook(client, "http://127.0.0.1:9/moved", "oppen-probe", secret) == "updated"
        rotated = SecretStr(SECRET + "-rotated")
        assert register_webhook(client, "http://127.0.0.1:9/moved", "oppen-probe", rotated) == "updated"
    finally:
        for hook in client.list_webhooks():
            if hook.name == "oppen-probe":
                client.delete_webhook(hook.webhook_id)


def test_a_version_registered_in_mlflow_becomes_oppen_events(lifecycle):
    version, run_id, started = lifecycle.register_version("wh-direct")
    registered = lifecycle.wait_event(MODEL_REGISTERED, "wh-direct")
    promoted = lifecycle.wait_event(MODEL_PROMOTED, "wh-direct", alias="development")
    assert registered.id == model_event_id(MODEL_REGISTERED, "wh-direct", version, None)
    assert registered.payload == {
        "name": "wh-direct", "version": version, "alias": None, "run_id": run_id, "source": "mlflow-webhook",
        "links": {"mlflow": f"{lifecycle.mlflow_uri}/#/models/wh-direct/versions/{version}"}}
    assert "oppen.model.alias" not in registered.resource
    assert [related.id for related in registered.related] == [f"mlflow.run.{run_id}"]
    assert promoted.id == model_event_id(MODEL_PROMOTED, "wh-direct", version, "development")
    assert promoted.resource["oppen.model.version"] == str(version)
    assert promoted.payload["alias"] == "development" and promoted.payload["source"] == "mlflow-webhook"
    latency = promoted.received.timestamp() - started
    print(f"\nlatency set_registered_model_alias -> Prefect has the event: {latency:.2f} s")


def test_a_forged_delivery_is_refused_and_emits_nothing(lifecycle):
    from mlflow.webhooks.delivery import _generate_hmac_signature

    def delivery(model: str, secret: str) -> tuple[dict[str, str], str]:
        body = json.dumps({"entity": "model_version_alias", "action": "created",
                           "timestamp": datetime.now(timezone.utc).isoformat(),
                           "data": {"name": model, "alias": "development", "version": "1"}})
        stamp = str(int(time.time()))
        return {"X-MLflow-Delivery-Id": model, "X-MLflow-Timestamp": stamp, "Content-Type": "application/json",
                "X-MLflow-Signature": _generate_hmac_signature(secret, model, stamp, body)}, body

    headers, body = delivery("wh-forged", "a-guess-at-the-secret")
    forged = httpx.post(lifecycle.receiver_url, content=body, headers=headers)
    assert forged.status_code == 401
    assert headers["X-MLflow-Signature"] not in lifecycle.stack.log("receiver")
    # A genuine delivery sent after the forged one: once its event is stored, anything the forged one
    # had emitted before it would be stored too.
    headers, body = delivery("wh-sentinel", SECRET)
    genuine = httpx.post(lifecycle.receiver_url, content=body, headers=headers)
    assert genuine.status_code == 200, genuine.text
    lifecycle.wait_event(MODEL_PROMOTED, "wh-sentinel", alias="development")
    assert lifecycle.events(MODEL_PROMOTED, "wh-forged") == []


def test_a_version_given_development_in_mlflow_is_promoted_by_the_trigger(deployed):
    from oppen.mlflow_webhook_receiver import emit_to_prefect
    from oppen.mlflow_webhooks import PrefectEventSpec

    tags = {METRIC_TAG: "test_accuracy", VALUE_TAG: "0.97", DIRECTION_TAG: "true"}
    version, _, started = deployed.register_version("wh-e2e", tags)
    event = deployed.wait_event(MODEL_PROMOTED, "wh-e2e", alias="development")
    # The training flow reports the same move under the same id: Prefect keeps one, the trigger fires once.
    duplicate = PrefectEventSpec(event=event.event, resource=dict(event.resource), payload={**event.payload,
                                 "source": "train-mnist"}, id=event.id, occurred=event.occurred)
    with prefect_api(deployed.stack.api_url):
        asyncio.run(emit_to_prefect([duplicate]))

    def created_run():
        # A trigger whose action the server refuses creates nothing: say why at once instead of timing out.
        assert deployed.failed_actions() == [], "the trigger fired but its run-deployment action failed"
        return deployed.promote_runs("wh-e2e")

    [run] = deployed.stack.wait_for(created_run, 120, "the trigger's promote-model run")
    assert {key: run.parameters[key] for key in ("model_name", "target", "only_if_better")} == {
        "model_name": "wh-e2e", "target": "staging", "only_if_better": True}
    assert int(run.parameters["version"]) == version
    state = deployed.stack.final_state(str(run.id), timeout=180)
    assert state.is_completed() and state.name == "Completed", state.message
    assert int(deployed.mlflow().get_model_version_by_alias("wh-e2e", "staging").version) == version
    # The promotion is itself an event (the hook for a serving-image build), from MLflow and the flow alike.
    deployed.wait_event(MODEL_PROMOTED, "wh-e2e", alias="staging")
    assert len(deployed.promote_runs("wh-e2e")) == 1
    run = deployed.stack.read_flow_run(str(run.id))
    print(f"\nlatency set_registered_model_alias -> event {event.received.timestamp() - started:.2f} s, "
          f"-> promote run created {run.created.timestamp() - started:.2f} s, "
          f"-> started {run.start_time.timestamp() - started:.2f} s, "
          f"-> staging set {run.end_time.timestamp() - started:.2f} s")


def test_the_secret_never_appears_in_logs(lifecycle):
    logs = {path.name: path.read_text(errors="replace") for path in lifecycle.stack.root.glob("*.log")}
    assert {"receiver.log", "mlflow.log", "server.log"} <= set(logs)
    assert "delivery" in logs["receiver.log"]  # it did log deliveries
    assert [name for name, text in logs.items() if SECRET in text] == []
