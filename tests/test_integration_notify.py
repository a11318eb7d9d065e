"""The notify stage through a real Prefect server, real MLflow and a local Slack: the summary, failures, secrets."""

from __future__ import annotations

import asyncio
import json
import time
from uuid import UUID

import httpx
import pytest
from mlflow import MlflowClient

from flows.train_mnist import train_mnist
from tests.slack_server import FakeSlack, hang, server_error
from tests.stack import poll_until
from training.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TOKEN = "xoxb-test-1234567890-SECRETTOKEN"
TINY = RunConfig(epochs=1, batch_size=128, learning_rate=5e-3, max_steps=12)
DEADLINE_S = 3.0


@pytest.fixture
def slack(in_process, monkeypatch):
    with FakeSlack() as fake:
        monkeypatch.setenv("OPPEN_SLACK_BOT_TOKEN", TOKEN)
        monkeypatch.setenv("OPPEN_SLACK_API_URL", fake.api_url)
        monkeypatch.setenv("OPPEN_SLACK_DEADLINE_S", str(DEADLINE_S))
        monkeypatch.setenv("OPPEN_MLFLOW_UI_URL", "http://mlflow.example:5000")  # the store is a file: name a UI
        yield fake


def _events(stack, name: str, flow_run_id: str, timeout: float = 30.0) -> list[dict]:
    """Events of `name` on this run, once the server has persisted them (it writes in batches)."""
    body = {"filter": {"event": {"name": [name]}, "any_resource": {"id": [f"oppen.run.{flow_run_id}"]}}, "limit": 50}
    return poll_until(lambda: httpx.post(f"{stack.api_url}/events/filter", json=body, timeout=10).json()["events"],
                      timeout, interval=0.5)


def _logs(stack, flow_run_id: str, expect: str, timeout: float = 30.0) -> str:
    """The run's logs on the server, once `expect` is among them (they are shipped in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))

    texts = []

    def arrived() -> bool:
        texts.append("\n".join(log.message for log in asyncio.run(read())))
        return expect in texts[-1]

    poll_until(arrived, timeout, interval=0.5)
    return texts[-1]


def _blocks_text(message: dict) -> str:
    return json.dumps(message["blocks"])


def test_a_finished_run_posts_its_summary_to_the_teams_channel(stack, slack):
    state = train_mnist(run=TINY, experiment="notify-ok", min_test_accuracy=0.0, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = str(state.state_details.flow_run_id)
    (message,) = slack.messages()
    assert message["channel"] == "#ml-runs"  # team `default` names no channel of its own
    blocks = _blocks_text(message)
    summary = state.result()
    assert f"${summary.cost.cost_usd:.6f}" in blocks and "accuracy" in blocks.lower()
    assert f"/runs/flow-run/{flow_run_id}" in blocks  # the Prefect UI
    assert summary.mlflow_run_id in blocks  # the MLflow UI's run page
    (recorded,) = slack.requests
    assert recorded.headers["Authorization"] == f"Bearer {TOKEN}"  # the token goes to Slack, and only there
    settled = _events(stack, "oppen.cost.settled", flow_run_id)
    assert settled and settled[0]["payload"]["run_cost_usd"] == pytest.approx(summary.cost.cost_usd)


@pytest.mark.parametrize("behaviour", [server_error(500), hang(60)], ids=["500", "hang"])
def test_slack_down_never_fails_the_run_and_the_failure_is_recorded(stack, slack, behaviour):
    slack.default = behaviour
    started = time.monotonic()
    state = train_mnist(run=TINY, experiment="notify-down", min_test_accuracy=0.0, return_state=True)
    elapsed = time.monotonic() - started
    assert state.is_completed(), state.message
    flow_run_id = str(state.state_details.flow_run_id)
    assert slack.requests and not slack.messages()
    (failed,) = _events(stack, "oppen.notification.failed", flow_run_id)
    assert failed["payload"]["message_kind"] == "run" and failed["payload"]["error"]
    assert "Slack message not delivered" in _logs(stack, flow_run_id, "Slack message not delivered")
    # Bounded: the whole notify stage (retries, Retry-After, a hang) within its deadline. A correctness bound on
    # a 3 s deadline, far from this machine's noise: the run itself takes ~20 s.
    notify_seconds = max(r.at for r in slack.requests) - min(r.at for r in slack.requests)
    assert notify_seconds <= DEADLINE_S + 1.0, notify_seconds
    assert elapsed > 0


def test_secrets_stay_out_of_logs_artifacts_parameters_and_mlflow(stack, slack, monkeypatch):
    webhook = "https://hooks.slack.example/services/T1/B2/SECRETWEBHOOKPATH"
    monkeypatch.setenv("OPPEN_SLACK_WEBHOOK_URL", webhook)  # set beside the token: the token wins, both are secrets
    monkeypatch.setenv("OPPEN_MLFLOW_WEBHOOK_SECRET", "hmac-SECRET-shared-with-mlflow")
    slack.default = server_error(500)  # the failure path is where a secret could leak into an error message
    state = train_mnist(run=TINY, experiment="notify-secrets", min_test_accuracy=0.0, return_state=True)
    flow_run_id = str(state.state_details.flow_run_id)
    secrets = (TOKEN, "SECRETWEBHOOKPATH", "hmac-SECRET")
    texts = [_logs(stack, flow_run_id, "Slack message not delivered"), json.dumps(_events(stack, "oppen.notification.failed", flow_run_id))]
    flow_run = stack.read_flow_run(flow_run_id)
    texts.append(json.dumps(flow_run.parameters, default=str))
    from tests.test_integration_cost import _artifacts

    texts += [json.dumps(artifact.data, default=str) for artifact in _artifacts(stack, flow_run_id)]
    run = MlflowClient(stack.tracking_uri).get_run(state.result().mlflow_run_id)
    texts.append(json.dumps({"params": run.data.params, "tags": run.data.tags}))
    for text in texts:
        assert not any(secret in text for secret in secrets)
    assert "Slack message not delivered" in texts[0]  # the failure was logged, without the secret


def test_the_weekly_cost_report_posts_the_spend_per_team_and_experiment(stack, slack):
    from flows.cost_report import ReportRequest, cost_report

    train_mnist(run=TINY, experiment="notify-report", min_test_accuracy=0.0)  # something spent this week
    report = cost_report(request=ReportRequest(last_days=7), post_to_slack=True)
    run_summary, message = slack.messages()  # the run posted its own ending first
    assert "notify-report" in _blocks_text(run_summary)
    blocks = _blocks_text(message)
    from oppen.cost.money import format_usd, to_micros
    from oppen.notify.blocks import MAX_REPORT_ROWS

    assert f"{format_usd(to_micros(report.total_usd))} over {report.runs} run" in blocks
    # The stack is the session's: other tests' experiments spent this week too. The message names the
    # costliest pairs and counts the rest; this run's experiment is in the report either way.
    scopes = sorted(report.by_scope, key=lambda row: float(row["actual_usd"]), reverse=True)
    assert any(row["experiment"] == "notify-report" for row in scopes)
    for row in scopes[:MAX_REPORT_ROWS]:
        assert row["experiment"][:20] in blocks
    if len(scopes) > MAX_REPORT_ROWS:
        assert f"and {len(scopes) - MAX_REPORT_ROWS} more" in blocks
    else:
        assert "notify-report" in blocks
    assert message["channel"] == "#ml-runs"  # a report across teams goes to the default channel
