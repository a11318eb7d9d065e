"""The Alertmanager receiver without servers: payload validation, the alert -> event mapping, deterministic ids,
the HTTP answers Alertmanager acts on (200, 400, 401, 503), and the Slack message automations.yaml makes of
the events (rendered in Prefect's own template sandbox, matched by Prefect's own trigger code)."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from datetime import datetime, timezone
from uuid import UUID, uuid4

import pytest
from prefect.server.events.jinja_filters import all_filters
from prefect.server.events.schemas.automations import Automation as ServerAutomation
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.server.schemas.responses import FlowRunResponse
from prefect.server.utilities.user_templates import register_user_template_filters, render_user_template_sync
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from pydantic import SecretStr
from starlette.testclient import TestClient

from oppen.alerts import receiver as receiver_module
from oppen.alerts.mapping import events_for
from oppen.alerts.payload import MalformedPayload, parse_payload
from oppen.alerts.receiver import WEBHOOK_PATH, ReceiverError, create_app, load_token, main
from oppen.automations import SlackTarget, load_automations_file, render_automations, template_variables
from oppen.events import ALERT_FIRING, ALERT_RESOLVED, CATALOG, alert_event_id
from oppen.notify.blocks import SlackMessage

RUN_ID = "7f2c1a52-54a6-4a39-9a2e-d1c6a3c3e001"
TOKEN = "alert-receiver-token-0123456789"
# What Alertmanager 0.25 posted for a firing alert (captured from a real one routed by alertmanager.yml).
FIRING = {
    "receiver": "oppen-prefect",
    "status": "firing",
    "alerts": [{
        "status": "firing",
        "labels": {"alertname": "OppenGpuUnderutilized", "experiment": "mnist", "flow_run_id": RUN_ID,
                   "instance": "10.1.2.3:9400", "job": "oppen-runs", "severity": "warning", "team": "vision",
                   "workload": "mnist"},
        "annotations": {"summary": "Run 7f2c1a52 uses its GPUs at 20%.",
                        "description": "Flow run 7f2c1a52 has kept its GPUs under 30% busy. <!channel> & co",
                        "runbook_url": "https://oppen.example.com/infra/monitoring/runbooks.md#oppengpuunderutilized",
                        "value": "20.25"},
        "startsAt": "2026-12-05T23:44:49.887229Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus.monitoring.svc:9090/graph?g0.expr=oppen_run_gpu_utilization_percent",
        "fingerprint": "6daedda48f8ada51",
    }],
    "groupLabels": {"alertname": "OppenGpuUnderutilized", "flow_run_id": RUN_ID},
    "commonLabels": {"alertname": "OppenGpuUnderutilized", "flow_run_id": RUN_ID, "severity": "warning"},
    "commonAnnotations": {"summary": "Run 7f2c1a52 uses its GPUs at 20%."},
    "externalURL": "http://alertmanager.monitoring.svc:9093",
    "version": "4",
    "groupKey": '{}/{alertname=~"Oppen.+"}:{alertname="OppenGpuUnderutilized"}',
    "truncatedAlerts": 0,
}


def resolved(payload: dict = FIRING, ends_at: str = "2026-12-05T23:52:04.5Z") -> dict:
    changed = copy.deepcopy(payload)
    changed["status"] = "resolved"
    for alert in changed["alerts"]:
        alert.update(status="resolved", endsAt=ends_at)
    return changed


def with_alert(**changes) -> dict:
    changed = copy.deepcopy(FIRING)
    changed["alerts"][0].update(changes)
    return changed


# --- the mapping -------------------------------------------------------------------------------------


def test_a_firing_alert_is_one_event_on_the_alert_related_to_its_run():
    [spec] = events_for(parse_payload(FIRING))
    assert spec.event == ALERT_FIRING and spec.event in CATALOG
    assert spec.resource == {
        "prefect.resource.id": "oppen.alert.OppenGpuUnderutilized", "prefect.resource.name": "OppenGpuUnderutilized",
        "oppen.alert.severity": "warning", "oppen.alert.fingerprint": "6daedda48f8ada51",
        "oppen.team": "vision", "oppen.experiment": "mnist", "oppen.workload": "mnist",
        **{f"oppen.alert.label.{k}": v for k, v in FIRING["alerts"][0]["labels"].items()}}
    assert {r["prefect.resource.role"]: r["prefect.resource.id"] for r in spec.related} == {
        "flow-run": f"prefect.flow-run.{RUN_ID}", "run": f"oppen.run.{RUN_ID}", "team": "oppen.team.vision",
        "experiment": "oppen.experiment.mnist"}
    assert spec.occurred == datetime(2026, 12, 5, 23, 44, 49, 887229, tzinfo=timezone.utc)
    assert spec.payload == {
        "alertname": "OppenGpuUnderutilized", "status": "firing", "severity": "warning",
        "summary": "Run 7f2c1a52 uses its GPUs at 20%.",
        "description": "Flow run 7f2c1a52 has kept its GPUs under 30% busy. <!channel> & co",
        "runbook_url": "https://oppen.example.com/infra/monitoring/runbooks.md#oppengpuunderutilized",
        "starts_at": "2026-12-05T23:44:49.887229+00:00", "ends_at": None, "value": 20.25,
        "labels": FIRING["alerts"][0]["labels"], "fingerprint": "6daedda48f8ada51",
        "links": {"runbook": "https://oppen.example.com/infra/monitoring/runbooks.md#oppengpuunderutilized",
                  "prometheus": FIRING["alerts"][0]["generatorURL"], "alertmanager": FIRING["externalURL"]}}
    assert set(spec.payload) == set(CATALOG[ALERT_FIRING].payload)


def test_a_resolved_alert_happened_when_it_ended_and_is_another_event_than_its_firing():
    [firing], [ended] = events_for(parse_payload(FIRING)), events_for(parse_payload(resolved()))
    assert ended.event == ALERT_RESOLVED and set(ended.payload) == set(CATALOG[ALERT_RESOLVED].payload)
    assert ended.occurred == datetime(2026, 12, 5, 23, 52, 4, 500000, tzinfo=timezone.utc)
    assert ended.payload["ends_at"] == "2026-12-05T23:52:04.500000+00:00"
    assert ended.id != firing.id and ended.resource == firing.resource


def test_ids_are_one_per_alert_start_and_status_so_retries_and_repeats_are_one_event():
    [first], [again] = events_for(parse_payload(FIRING)), events_for(parse_payload(copy.deepcopy(FIRING)))
    assert first.id == again.id == alert_event_id("6daedda48f8ada51", "firing", first.occurred)
    # The same alert firing anew after it resolved is a new start: a new event.
    [refired] = events_for(parse_payload(with_alert(startsAt="2026-12-06T01:00:00Z")))
    [other] = events_for(parse_payload(with_alert(fingerprint="0123456789abcdef")))
    assert len({first.id, refired.id, other.id}) == 3
    # The same instant written another way (Alertmanager's nanoseconds, another zone) is the same start.
    [same] = events_for(parse_payload(with_alert(startsAt="2026-12-06T00:44:49.887229+01:00")))
    assert same.id == first.id


def test_a_run_id_that_is_not_a_uuid_stays_a_label_and_platform_alerts_relate_to_nothing_but_their_team():
    labels = {**FIRING["alerts"][0]["labels"], "flow_run_id": "not-a-uuid"}
    [spec] = events_for(parse_payload(with_alert(labels=labels)))
    assert [r["prefect.resource.role"] for r in spec.related] == ["team", "experiment"]
    assert spec.resource["oppen.alert.label.flow_run_id"] == "not-a-uuid"
    platform = {"alertname": "OppenQueueNoWorker", "pool": "kubernetes-gpu", "severity": "critical"}
    [spec] = events_for(parse_payload(with_alert(labels=platform, annotations={})))
    assert spec.related == [] and "oppen.team" not in spec.resource
    assert spec.resource["oppen.alert.severity"] == "critical"
    assert spec.resource["oppen.alert.label.pool"] == "kubernetes-gpu"
    assert spec.payload["summary"] is None and spec.payload["value"] is None and spec.payload["links"]["alertmanager"]


@pytest.mark.parametrize("text, value", [("0.9", 0.9), ("1e3", 1000.0), ("NaN", None), ("+Inf", None), ("x", None)])
def test_the_value_annotation_is_a_number_json_can_carry(text, value):
    [spec] = events_for(parse_payload(with_alert(annotations={"value": text})))
    assert spec.payload["value"] == value


def test_only_web_links_are_kept():
    [spec] = events_for(parse_payload(with_alert(generatorURL="", annotations={"runbook_url": "javascript:alert(1)"})))
    assert spec.payload["links"] == {"alertmanager": FIRING["externalURL"]}


BAD = {
    "another version": ({**FIRING, "version": "3"}, "version: Input should be '4'"),
    "no alertname": (with_alert(labels={"severity": "warning"}), "an alert has no alertname label"),
    "a field version 4 does not have": ({**FIRING, "colour": "red"}, "colour: Extra inputs are not permitted"),
    "a fingerprint that is not Alertmanager's": (with_alert(fingerprint="zz"), "fingerprint: String should match"),
    "a status of neither kind": (with_alert(status="pending"), "status: Input should be 'firing' or 'resolved'"),
    "a label that is not text": (with_alert(labels={"alertname": "X", "n": 1}),
                                 "labels.n: Input should be a valid string"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_payload_that_is_not_alertmanagers_is_one_sentence(case):
    payload, expected = BAD[case]
    with pytest.raises(MalformedPayload) as raised:
        parse_payload(payload)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert str(raised.value).startswith("not an Alertmanager version 4 webhook payload")


# --- the HTTP answers -------------------------------------------------------------------------------


class FakePrefect:
    """Prefect's server as the receiver sees it: what it stores, and whether it can be reached."""

    def __init__(self) -> None:
        self.stored: dict[UUID, object] = {}
        self.emitted: list[list] = []
        self.down = False
        self.slow = 0.0

    async def emit(self, specs) -> None:
        await asyncio.sleep(self.slow)
        if self.down:
            raise ConnectionRefusedError("connect call failed")
        self.emitted.append(list(specs))
        self.stored |= {spec.id: spec for spec in specs}

    async def known(self, specs) -> set[UUID]:
        if self.down:
            raise ConnectionRefusedError("connect call failed")
        return {spec.id for spec in specs if spec.id in self.stored}


@pytest.fixture
def prefect() -> FakePrefect:
    return FakePrefect()


@pytest.fixture
def client(prefect) -> TestClient:
    return TestClient(create_app(SecretStr(TOKEN), emit=prefect.emit, known=prefect.known))


def post(client: TestClient, payload, token: str | None = TOKEN, **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    return client.post(WEBHOOK_PATH, content=body, headers={**headers, "Content-Type": "application/json"}, **kwargs)


def test_a_notification_is_answered_200_once_prefect_has_its_events(client, prefect):
    response = post(client, FIRING)
    assert response.status_code == 200
    [spec] = prefect.emitted[0]
    assert response.json() == {"events": [{"event": ALERT_FIRING, "id": str(spec.id),
                                           "alertname": "OppenGpuUnderutilized", "sent": True}]}


def test_a_retry_or_repeat_of_an_event_prefect_has_is_acknowledged_without_sending_it_again(client, prefect):
    assert post(client, FIRING).status_code == 200
    again = post(client, FIRING)
    assert again.status_code == 200 and again.json()["events"][0]["sent"] is False
    assert len(prefect.emitted) == 1
    assert post(client, resolved()).json()["events"][0]["sent"] is True  # its resolution is news
    assert [specs[0].event for specs in prefect.emitted] == [ALERT_FIRING, ALERT_RESOLVED]


def test_prefect_unreachable_or_too_slow_is_503_so_alertmanager_retries(client, prefect, monkeypatch):
    prefect.down = True
    response = post(client, FIRING)
    assert response.status_code == 503 and "ConnectionRefusedError" in response.json()["error"]
    prefect.down, prefect.slow = False, 1.0
    monkeypatch.setattr(receiver_module, "PREFECT_TIMEOUT_S", 0.1)
    response = post(client, FIRING)
    assert response.status_code == 503 and "timed out" in response.json()["error"]


def test_when_prefect_cannot_say_what_it_has_the_events_are_sent_rather_than_held(prefect):
    async def unanswered(specs):
        raise RuntimeError("events API refused the filter")

    response = post(TestClient(create_app(SecretStr(TOKEN), emit=prefect.emit, known=unanswered)), FIRING)
    assert response.status_code == 200 and response.json()["events"][0]["sent"] is True and prefect.emitted


def test_without_the_token_nothing_is_read_or_sent_and_the_token_is_never_logged(client, prefect, caplog):
    caplog.set_level(logging.DEBUG)
    for token in (None, "wrong-" + TOKEN, TOKEN[:-1]):
        response = post(client, FIRING, token=token)
        assert response.status_code == 401, token
    basic = client.post(WEBHOOK_PATH, content=json.dumps(FIRING), headers={"Authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401 and not prefect.emitted
    assert post(client, FIRING).status_code == 200
    assert TOKEN not in caplog.text and TOKEN[:-1] not in caplog.text


def test_bad_bodies_are_400_with_the_reason(client, prefect):
    response = post(client, b"{not json")
    assert response.status_code == 400 and response.json() == {"error": "the body is not JSON"}
    response = post(client, {**FIRING, "version": "3"})
    assert response.status_code == 400 and "version" in response.json()["error"]
    assert post(client, b"x" * (receiver_module.MAX_BODY_BYTES + 1)).status_code == 413
    assert not prefect.emitted


def test_without_a_token_configured_any_caller_is_accepted(prefect):
    open_client = TestClient(create_app(None, emit=prefect.emit, known=prefect.known))
    assert post(open_client, FIRING, token=None).status_code == 200
    assert TestClient(create_app(None)).get("/healthz").json() == {"status": "ok"}


def test_the_token_setting_is_checked_and_a_mistake_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("OPPEN_ALERT_RECEIVER_TOKEN", raising=False)
    assert load_token() is None
    monkeypatch.setenv("OPPEN_ALERT_RECEIVER_TOKEN", TOKEN)
    assert load_token().get_secret_value() == TOKEN
    monkeypatch.setenv("OPPEN_ALERT_RECEIVER_TOKEN", "short")
    with pytest.raises(ReceiverError, match="at least 16 characters"):
        load_token()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: OPPEN_ALERT_RECEIVER_TOKEN must be") and err.count("\n") == 1 and "short" not in err


# --- what automations.yaml does with the events -----------------------------------------------------------

UI = "http://prefect.test"
BOT = SlackTarget("bot", "http://slack.test/api/chat.postMessage", {}, "#ml-runs", {"vision": "#vision-runs"})


@pytest.fixture(scope="module")
def alert_automation() -> tuple[ServerAutomation, str, dict]:
    spec = load_automations_file()
    [plan] = [plan for plan in render_automations(spec, UUID(int=1)) if plan.name == "oppen: alert"]
    server = ServerAutomation.model_validate({**plan.automation.model_dump(mode="json"), "id": uuid4()})
    return server, spec.payload_template("alert"), template_variables(spec, BOT, None)


def _received(payload: dict) -> ReceivedEvent:
    [spec] = events_for(parse_payload(payload))
    return ReceivedEvent(**spec.model_dump(mode="json"))


def _slack(alert_automation, event: ReceivedEvent, flow_run=None) -> dict:
    automation, template, variables = alert_automation
    register_user_template_filters(all_filters)
    with temporary_settings({PREFECT_UI_URL: UI}):
        text = render_user_template_sync(template, {"event": event, "flow_run": flow_run, "automation": automation,
                                                    "variables": {"oppen_automations": variables}})
    message = json.loads(text)
    SlackMessage(text=message["text"], blocks=message["blocks"])  # Slack's limits, as oppen/notify checks them
    return message


def _fields(message: dict) -> dict[str, str]:
    return {f["text"].split("\n", 1)[0].strip("*"): f["text"].split("\n", 1)[1]
            for block in message["blocks"] if block["type"] == "section" for f in block.get("fields", [])}


def _buttons(message: dict) -> dict[str, str]:
    return {e["text"]["text"]: e["url"] for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]}


def test_the_alert_automation_matches_both_events_and_nothing_else(alert_automation):
    trigger = alert_automation[0].trigger
    assert trigger.covers(_received(FIRING)) and trigger.covers(_received(resolved()))
    other = _received(FIRING).model_copy(update={"event": "oppen.budget.warning"})
    assert not trigger.covers(other)


def test_a_firing_alert_posts_its_summary_runbook_and_run_to_the_teams_channel(alert_automation):
    run = FlowRunResponse(id=UUID(RUN_ID), name="wise-otter", flow_id=uuid4(), tags=[])
    message = _slack(alert_automation, _received(FIRING), run)
    assert message["channel"] == "#vision-runs"
    assert message["blocks"][0]["text"]["text"] == ":warning: Run 7f2c1a52 uses its GPUs at 20%."
    # Slack reads `<!channel>` in mrkdwn as a mention: the description is escaped.
    assert message["blocks"][1]["text"]["text"] == \
        "Flow run 7f2c1a52 has kept its GPUs under 30% busy. &lt;!channel&gt; &amp; co"
    fields = _fields(message)
    assert fields["Alert"] == "OppenGpuUnderutilized" and fields["Severity"] == "warning"
    assert fields["Status"] == "firing since 2026-12-05 23:44:49 UTC" and fields["Run"] == "wise-otter"
    assert fields["Team / experiment"] == "vision / mnist" and "Work pool" not in fields
    assert _buttons(message) == {"Prefect run": f"{UI}/runs/flow-run/{RUN_ID}",
                                 "Runbook": FIRING["alerts"][0]["annotations"]["runbook_url"],
                                 "Prometheus": FIRING["alerts"][0]["generatorURL"]}


def test_a_resolved_platform_alert_posts_to_the_default_channel(alert_automation):
    platform = with_alert(labels={"alertname": "OppenQueueNoWorker", "pool": "kubernetes-gpu", "severity": "critical"},
                          annotations={"summary": "Pool kubernetes-gpu has due runs and no worker online."})
    firing = _slack(alert_automation, _received(platform))
    assert firing["channel"] == "#ml-runs" and firing["blocks"][0]["text"]["text"].startswith(":rotating_light: Pool")
    message = _slack(alert_automation, _received(resolved(platform)))
    assert message["blocks"][0]["text"]["text"] == \
        ":white_check_mark: Resolved: Pool kubernetes-gpu has due runs and no worker online."
    fields = _fields(message)
    assert fields["Status"] == "resolved at 2026-12-05 23:52:04 UTC" and fields["Work pool"] == "kubernetes-gpu"
    assert "Run" not in fields and "Prefect run" not in _buttons(message)
