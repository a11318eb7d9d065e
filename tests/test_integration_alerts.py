"""Alerts end to end: a real Alertmanager (the shipped alertmanager.yml, tests/alertmanager.py) delivers an Oppen
alert to the receiver (`python -m oppen.alerts.receiver serve`, with its bearer token), which emits it to a real
`prefect server start`; automations.yaml's "oppen: alert" then posts it to a fake Slack (tests/slack_server.py).
A redelivery of the same notification is neither a second event nor a second message.

Its own server rather than the session's `stack`: applying automations.yaml (with a Slack that lives only
for this module) would leave automations posting from the session's server after this module ends.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from datetime import datetime, timezone

import httpx
import pytest

from oppen.automations import DEFAULT_FILE, apply_automations
from oppen.events import ALERT_FIRING, ALERT_RESOLVED, alert_event_id
from oppen.local_stack import free_port, wait_http
from tests.alertmanager import Alertmanager, needs_alertmanager
from tests.slack_server import FakeSlack
from tests.slack_stack import slack_stack
from tests.stack import PrefectStack

pytestmark = [pytest.mark.slow, pytest.mark.integration, needs_alertmanager]

TOKEN = "it-" + os.urandom(16).hex()
SLACK_TOKEN = "xoxb-alerts-test-token"
ALERTNAME = "OppenGpuUnderutilized"


@pytest.fixture(scope="module")
def slack():
    with FakeSlack() as fake:
        yield fake


@pytest.fixture(scope="module")
def stack(tmp_path_factory, slack):
    # Events reach the database within half a second, so reading them back waits less.
    with slack_stack(tmp_path_factory.mktemp("alerts"), slack.api_url, SLACK_TOKEN,
                     server_env={"PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "0.5"}) as stack:
        apply_automations(DEFAULT_FILE)
        yield stack


@pytest.fixture(scope="module")
def receiver_url(stack) -> str:
    port = free_port()
    stack.env["OPPEN_ALERT_RECEIVER_TOKEN"] = TOKEN  # the receiver reads its token from its environment
    process = stack.spawn("receiver", [sys.executable, "-m", "oppen.alerts.receiver", "serve", "--port", str(port)])
    wait_http(f"http://127.0.0.1:{port}/healthz", 60, process, stack.root / "receiver.log")
    return f"http://127.0.0.1:{port}/alertmanager"


@pytest.fixture(scope="module")
def alertmanager(stack, receiver_url):
    token_file = stack.root / "receiver-token"
    token_file.write_text(TOKEN)
    # group_interval shortened so a resolution is delivered in seconds; group_wait and the rest as shipped.
    with Alertmanager(stack.root / "alertmanager", receiver_url, token_file, route={"group_interval": "5s"}) as am:
        yield am


def _prefect(call):
    from prefect.client.orchestration import get_client

    async def run():
        async with get_client() as client:
            return await call(client)

    return asyncio.run(run())


def _events(name: str) -> list:
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    event_filter = EventFilter(event=EventNameFilter(name=[name]),
                               resource=EventResourceFilter(id=[f"oppen.alert.{ALERTNAME}"]))
    return _prefect(lambda client: client.read_events(filter=event_filter, limit=50)).events


def _wait(stack: PrefectStack, predicate, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\nreceiver log:\n{stack.log('receiver')}")


def _headers(slack: FakeSlack, part: str) -> list[str]:
    return [r.body["blocks"][0]["text"]["text"] for r in slack.requests
            if isinstance(r.body, dict) and r.body.get("blocks") and part in r.body["blocks"][0]["text"]["text"]]


@pytest.fixture(scope="module")
def flow_run(stack):
    """A flow run the alert is about (Scheduled, on no pool: it never runs)."""
    from prefect import flow
    from prefect.states import Scheduled

    @flow(name="alerts-probe")
    def probe() -> None:
        pass

    return _prefect(lambda client: client.create_flow_run(probe, name="wise-otter", state=Scheduled()))


@pytest.fixture(scope="module")
def fired(stack, slack, alertmanager, flow_run):
    """One Oppen alert posted to Alertmanager, as Prometheus would post it; returns (alert as Alertmanager holds it,
    the Prefect event, when it was posted)."""
    labels = {"alertname": ALERTNAME, "severity": "warning", "team": "vision", "experiment": "mnist",
              "workload": "mnist", "flow_run_id": str(flow_run.id), "job": "oppen-runs"}
    annotations = {"summary": f"Run {flow_run.id} uses its GPUs at 12%.",
                   "description": "It has kept its GPUs under 30% busy for over a minute.",
                   "runbook_url": "https://oppen.example.com/infra/monitoring/runbooks.md#oppengpuunderutilized",
                   "value": "12.5"}
    posted = time.time()
    alertmanager.post_alerts([{"labels": labels, "annotations": annotations,
                               "generatorURL": "http://prometheus.test/graph?g0.expr=x"}])
    [held] = _wait(stack, lambda: alertmanager.alerts(), "Alertmanager to hold the alert")
    [event] = _wait(stack, lambda: _events(ALERT_FIRING), "the firing event in Prefect")
    return held, event, posted


def _started(held: dict) -> datetime:
    return datetime.fromisoformat(held["startsAt"].replace("Z", "+00:00"))


def test_an_alert_reaches_prefect_as_one_event_about_its_run(fired, flow_run):
    held, event, posted = fired
    # Alertmanager's API shows startsAt to the millisecond, its webhook to the nanosecond (kept to the microsecond).
    starts_at = datetime.fromisoformat(event.payload["starts_at"])
    assert abs((starts_at - _started(held)).total_seconds()) < 0.001
    assert event.id == alert_event_id(held["fingerprint"], "firing", starts_at)
    assert event.occurred == starts_at
    assert event.resource.id == f"oppen.alert.{ALERTNAME}" and event.resource["oppen.team"] == "vision"
    assert event.resource["oppen.alert.severity"] == "warning"
    assert event.resource["oppen.alert.label.flow_run_id"] == str(flow_run.id)
    assert f"prefect.flow-run.{flow_run.id}" in [related.id for related in event.related]
    assert event.payload["value"] == 12.5 and event.payload["fingerprint"] == held["fingerprint"]
    assert event.payload["links"]["prometheus"] == "http://prometheus.test/graph?g0.expr=x"
    # Alertmanager waits group_wait (10 s) before it notifies; what follows is the receiver and Prefect.
    print(f"\nposted to Alertmanager -> Prefect received the event: {event.received.timestamp() - posted:.2f} s")


def test_the_alert_automation_posts_it_to_the_teams_channel(stack, slack, fired, flow_run):
    _wait(stack, lambda: _headers(slack, "uses its GPUs at 12%"), "the alert's Slack message")
    [request] = [r for r in slack.requests if isinstance(r.body, dict) and r.body.get("blocks")
                 and "uses its GPUs at 12%" in r.body["blocks"][0]["text"]["text"]]
    assert request.path == "/api/chat.postMessage" and request.headers["Authorization"] == f"Bearer {SLACK_TOKEN}"
    assert request.body["channel"] == "#vision-runs"
    buttons = {e["text"]["text"]: e["url"] for b in request.body["blocks"] if b["type"] == "actions"
               for e in b["elements"]}
    assert buttons["Runbook"].endswith("#oppengpuunderutilized") and buttons["Prefect run"].endswith(str(flow_run.id))
    fields = [f["text"] for b in request.body["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    assert "*Run*\nwise-otter" in fields


def test_a_redelivery_is_no_second_event_or_message_and_a_resolution_is_one_more(stack, slack, alertmanager, fired,
                                                                                     receiver_url):
    held, event, _ = fired
    _wait(stack, lambda: _headers(slack, "uses its GPUs at 12%"), "the alert's Slack message")
    notification = {
        "version": "4", "groupKey": "{}:{}", "truncatedAlerts": 0, "status": "firing", "receiver": "oppen-prefect",
        "groupLabels": {}, "commonLabels": held["labels"], "commonAnnotations": held["annotations"],
        "externalURL": alertmanager.url,
        "alerts": [{"status": "firing", "labels": held["labels"], "annotations": held["annotations"],
                    "startsAt": event.payload["starts_at"], "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": held["generatorURL"], "fingerprint": held["fingerprint"]}]}
    refused = httpx.post(receiver_url, json=notification, timeout=30)
    assert refused.status_code == 401
    again = httpx.post(receiver_url, json=notification, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert again.status_code == 200, again.text
    assert again.json()["events"] == [{"event": ALERT_FIRING, "id": str(event.id), "alertname": ALERTNAME,
                                       "sent": False}]

    # Resolve it in Alertmanager; its resolved notification, and the Slack message for it, come after anything
    # the redelivery could have caused, so they mark the point by which a second message would have arrived.
    alertmanager.post_alerts([{"labels": held["labels"], "annotations": held["annotations"],
                               "startsAt": held["startsAt"], "endsAt": datetime.now(timezone.utc).isoformat()}])
    [ended] = _wait(stack, lambda: _events(ALERT_RESOLVED), "the resolved event in Prefect")
    started = datetime.fromisoformat(ended.payload["starts_at"])
    assert ended.id == alert_event_id(held["fingerprint"], "resolved", started)
    assert ended.payload["ends_at"] and ended.occurred == datetime.fromisoformat(ended.payload["ends_at"])
    _wait(stack, lambda: _headers(slack, "Resolved: Run"), "the resolution's Slack message")
    assert len(_events(ALERT_FIRING)) == 1
    assert len(_headers(slack, "uses its GPUs at 12%")) == 2  # the firing message, and the resolution's
    assert len(_headers(slack, ":warning: Run")) == 1
    assert ended.id != event.id
