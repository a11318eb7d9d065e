"""automations.yaml without a server: it validates, renders to Prefect automations, matches what it should
(Prefect's own server-side matcher), and every Slack payload renders, in Prefect's template sandbox, to
Block Kit JSON that survives quotes, newlines and Slack's control characters in run names."""

from __future__ import annotations

import json
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import UUID, uuid4

import pytest
import yaml
from prefect.server.events.jinja_filters import all_filters
from prefect.server.events.schemas.automations import Automation as ServerAutomation
from prefect.server.events.schemas.events import ReceivedEvent
from prefect.server.schemas.responses import FlowRunResponse
from prefect.server.utilities.user_templates import register_user_template_filters, render_user_template_sync
from prefect.settings import PREFECT_UI_URL, temporary_settings
from prefect_kubernetes.diagnostics import DiagnosisCategory

from oppen.automations import (
    DEFAULT_FILE,
    PREFIX,
    AutomationsFileError,
    SlackAction,
    SlackTarget,
    load_automations_file,
    main,
    render_automations,
    template_variables,
)
from oppen.events import CATALOG
from oppen.notify.blocks import SlackMessage

BLOCK_ID = UUID("00000000-0000-0000-0000-00000000b10c")
RUN_ID = "7f2c1a52-54a6-4a39-9a2e-d1c6a3c3e001"
DEPLOYMENT_ID = "0d7e3c9b-3c57-4bd3-8d8e-6f0d6ad9c002"
NASTY_NAME = 'wise-"otter"\n<!channel> & co'
UI = "http://prefect.test"
MLFLOW_UI = "http://mlflow.test"
BOT = SlackTarget("bot", "http://slack.test/api/chat.postMessage", {}, "#ml-runs", {"vision": "#vision-runs"})
# prefect-kubernetes' observer (observer.py) sends these, no others.
POD_EVENTS = {f"prefect.kubernetes.pod.{phase}" for phase in ("pending", "running", "succeeded", "failed", "evicted")}


@pytest.fixture(scope="module")
def spec():
    return load_automations_file()


@pytest.fixture(scope="module")
def server_automations(spec) -> dict[str, ServerAutomation]:
    """As the server holds them: its own models validate the actions and payload templates again."""
    return {plan.name: ServerAutomation.model_validate({**plan.automation.model_dump(mode="json"), "id": uuid4()})
            for plan in render_automations(spec, BLOCK_ID)}


# --- the file -----------------------------------------------------------------------------------


def test_shipped_file_renders_every_automation_with_slack(spec):
    planned = render_automations(spec, BLOCK_ID)
    assert [plan.name for plan in planned] == [automation.name for automation in spec.automations]
    assert all(plan.name.startswith(PREFIX) and plan.automation is not None for plan in planned)
    webhooks = [action for plan in planned for action in plan.automation.actions if action.type == "call-webhook"]
    assert webhooks and all(action.block_document_id == BLOCK_ID for action in webhooks)


def test_events_it_matches_are_ones_that_exist(spec):
    for automation in spec.automations:
        trigger = automation.trigger
        for name in [*trigger.get("expect", []), *trigger.get("after", [])]:
            if name.startswith("oppen."):
                assert name in CATALOG, f"{automation.name}: {name} is not in oppen.events.CATALOG"
            elif name.startswith("prefect.kubernetes."):
                assert name in POD_EVENTS, f"{automation.name}: the observer never sends {name}"
            else:
                assert name.startswith("prefect.flow-run."), f"{automation.name}: unexpected event {name}"


def test_without_slack_only_slack_only_automations_are_skipped(spec):
    planned = {plan.name: plan for plan in render_automations(spec, None)}
    skipped = {name for name, plan in planned.items() if plan.automation is None}
    assert skipped == {"oppen: budget warning", "oppen: budget refused or stopped", "oppen: training run failed",
                       "oppen: GPU underutilized", "oppen: training slower than its history", "oppen: alert"}
    assert all("Slack is not configured" in planned[name].skipped_because for name in skipped)
    assert [a.type for a in planned["oppen: late run cancelled"].automation.actions] == ["change-flow-run-state"]
    assert [a.type for a in planned["oppen: pod unschedulable too long"].automation.actions] == ["change-flow-run-state"]


def test_settings_reach_triggers_actions_and_messages():
    spec = load_automations_file(overrides={"late_after_minutes": 15, "pause_deployment_on_refusal": True})
    planned = {plan.name: plan.automation for plan in render_automations(spec, BLOCK_ID)}
    late = planned["oppen: late run cancelled"]
    assert late.trigger.within == timedelta(minutes=15)
    assert "Late by more than 15 minutes" in late.actions[0].message
    assert planned["oppen: pod unschedulable too long"].trigger.within == timedelta(minutes=10)
    refused = planned["oppen: budget refused or stopped"].actions
    assert [a.type for a in refused] == ["call-webhook", "pause-deployment"] and refused[1].source == "inferred"
    default = {p.name: p.automation for p in render_automations(load_automations_file(), BLOCK_ID)}
    assert [a.type for a in default["oppen: budget refused or stopped"].actions] == ["call-webhook"]


def test_rendering_is_stable(spec):
    """Two renderings compare equal: the apply command's "unchanged" rests on it."""
    first, second = render_automations(spec, BLOCK_ID), render_automations(load_automations_file(), BLOCK_ID)
    assert [p.automation.model_dump(exclude={"id"}) for p in first] == \
           [p.automation.model_dump(exclude={"id"}) for p in second]


# --- what the triggers match (Prefect's server-side matcher) ------------------------------------------


def _event(name: str, resource: dict, related: list[dict] | None = None, payload: dict | None = None) -> ReceivedEvent:
    return ReceivedEvent(occurred=datetime.now(timezone.utc), event=name, resource=resource, related=related or [],
                         payload=payload or {}, id=uuid4())


def _flow_run_event(state: str, tags=("training", "mnist"), message: str = "boom", state_type: str = "FAILED"):
    related = [
        {"prefect.resource.id": f"prefect.flow.{uuid4()}", "prefect.resource.role": "flow",
         "prefect.resource.name": "train-mnist"},
        {"prefect.resource.id": f"prefect.deployment.{DEPLOYMENT_ID}", "prefect.resource.role": "deployment",
         "prefect.resource.name": "local"},
        {"prefect.resource.id": f"prefect.work-queue.{uuid4()}", "prefect.resource.role": "work-queue",
         "prefect.resource.name": "normal"},
        {"prefect.resource.id": f"prefect.work-pool.{uuid4()}", "prefect.resource.role": "work-pool",
         "prefect.resource.name": "local", "prefect.work-pool.type": "process"},
        *({"prefect.resource.id": f"prefect.tag.{tag}", "prefect.resource.role": "tag"} for tag in tags),
    ]
    return _event(f"prefect.flow-run.{state}", {
        "prefect.resource.id": f"prefect.flow-run.{RUN_ID}", "prefect.resource.name": NASTY_NAME,
        "prefect.run-count": "1", "prefect.state-message": message, "prefect.state-name": state,
        "prefect.state-timestamp": "2026-11-23T10:00:00+00:00", "prefect.state-type": state_type}, related)


def _pod_event(phase: str, diagnosis: str | None) -> ReceivedEvent:
    """As prefect-kubernetes' observer builds it (observer.py, _replicate_pod_event)."""
    resource = {"prefect.resource.id": "prefect.kubernetes.pod.5b3c-uid", "prefect.resource.name": "train-abc-xyz",
                "kubernetes.namespace": "oppen"}
    if diagnosis:
        resource["kubernetes.diagnosis"] = diagnosis
    related = [
        {"prefect.resource.id": f"prefect.flow-run.{RUN_ID}", "prefect.resource.role": "flow-run",
         "prefect.resource.name": "wise-otter"},
        {"prefect.resource.id": f"prefect.deployment.{DEPLOYMENT_ID}", "prefect.resource.role": "deployment",
         "prefect.resource.name": "train-mnist/gpu"},
        {"prefect.resource.id": f"prefect.flow.{uuid4()}", "prefect.resource.role": "flow",
         "prefect.resource.name": "train-mnist"},
        {"prefect.resource.id": f"prefect.work-pool.{uuid4()}", "prefect.resource.role": "work-pool",
         "prefect.resource.name": "kubernetes-gpu"},
        {"prefect.resource.id": "prefect.worker.kubernetes.gpu-worker-1", "prefect.resource.role": "worker",
         "prefect.resource.name": "gpu-worker-1", "prefect.worker-type": "kubernetes", "prefect.version": "0.8.0"},
    ]
    return _event(f"prefect.kubernetes.pod.{phase}", resource, related)


def _run_event(name: str, payload: dict, links: dict | None = None) -> ReceivedEvent:
    """As oppen/events.py's RunEventContext builds it."""
    resource = {"prefect.resource.id": f"oppen.run.{RUN_ID}", "oppen.team": "vision", "oppen.experiment": "mnist",
                "oppen.workload": "train-mnist", "prefect.resource.name": NASTY_NAME}
    related = [{"prefect.resource.id": f"prefect.flow-run.{RUN_ID}", "prefect.resource.role": "flow-run"},
               {"prefect.resource.id": f"prefect.deployment.{DEPLOYMENT_ID}", "prefect.resource.role": "deployment"},
               {"prefect.resource.id": "oppen.team.vision", "prefect.resource.role": "team"},
               {"prefect.resource.id": "oppen.experiment.mnist", "prefect.resource.role": "experiment"},
               {"prefect.resource.id": "mlflow.run.abc123", "prefect.resource.role": "mlflow-run"}]
    return _event(name, resource, related, {**payload, "links": links or {}})


def test_failed_training_runs_match_but_named_endings_and_untagged_runs_do_not(server_automations):
    trigger = server_automations["oppen: training run failed"].trigger
    for state in ("Failed", "Crashed", "TimedOut"):
        assert trigger.covers(_flow_run_event(state)), state
    assert not trigger.covers(_flow_run_event("OverBudget"))  # the flow reports its own endings
    assert not trigger.covers(_flow_run_event("InvalidRequest"))
    assert not trigger.covers(_flow_run_event("Failed", tags=("cost",)))


def test_only_unschedulable_pods_mark_their_run(server_automations):
    markers = {name: a.trigger for name, a in server_automations.items() if "(mark " in name}
    unschedulable = [c.value for c in DiagnosisCategory if c.value.startswith("Unschedulable")]
    for diagnosis in unschedulable:
        covering = [name for name, trigger in markers.items() if trigger.covers(_pod_event("pending", diagnosis))]
        assert len(covering) == 1, f"{diagnosis}: marked by {covering}"
        marks = [a for a in server_automations[covering[0]].actions if a.type == "change-flow-run-state"]
        assert marks[0].state.value == "PENDING" and marks[0].name == diagnosis
    for other in (None, "ImagePullError", "CrashLoopBackOff"):
        assert not any(t.covers(_pod_event("pending", other)) for t in markers.values()), other
    assert not any(t.covers(_pod_event("running", None)) for t in markers.values())


def test_every_mark_starts_the_unschedulable_window_and_only_starting_ends_it(server_automations):
    trigger = server_automations["oppen: pod unschedulable too long"].trigger
    assert trigger.posture.value == "Proactive" and trigger.for_each == {"prefect.resource.id"}
    for category in DiagnosisCategory:
        if category.value.startswith("Unschedulable"):
            assert trigger.starts_after(f"prefect.flow-run.{category.value}"), category
    assert trigger.covers(_flow_run_event("Unschedulable.Taint", state_type="PENDING"))
    for moved_on in ("Running", "Crashed", "Cancelling", "Cancelled", "AwaitingRetry"):
        assert trigger.expects(f"prefect.flow-run.{moved_on}"), moved_on
    # The observer may still propose these for a pod that waits: they must not count as a start.
    assert not trigger.expects("prefect.flow-run.InfrastructurePending")
    assert not trigger.expects("prefect.flow-run.Pending")


def test_a_late_run_is_waited_for_until_a_worker_takes_it(server_automations):
    trigger = server_automations["oppen: late run cancelled"].trigger
    assert trigger.starts_after("prefect.flow-run.Late") and not trigger.expects("prefect.flow-run.Late")
    assert trigger.expects("prefect.flow-run.Pending") and trigger.expects("prefect.flow-run.Cancelled")
    cancel = server_automations["oppen: late run cancelled"].actions[0]
    assert cancel.state.value == "CANCELLED" and "10 minutes" in cancel.message


# --- the Slack payloads -------------------------------------------------------------------------------


def _flow_run(tags: list[str]) -> FlowRunResponse:
    return FlowRunResponse(id=UUID(RUN_ID), name=NASTY_NAME, flow_id=uuid4(), tags=tags,
                           infrastructure_pid="cluster:oppen:train-abc")


def _alert_event() -> ReceivedEvent:
    """As the Alertmanager receiver builds it (oppen/alerts/mapping.py) from a firing alert about a run."""
    from oppen.alerts.mapping import event_for
    from oppen.alerts.payload import Alert

    alert = Alert.model_validate({
        "status": "firing", "fingerprint": "6daedda48f8ada51", "startsAt": "2026-11-23T12:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z", "generatorURL": "http://prometheus.test/graph?g0.expr=x",
        "labels": {"alertname": "OppenGpuUnderutilized", "severity": "warning", "team": "vision",
                   "experiment": "mnist", "workload": "mnist", "flow_run_id": RUN_ID},
        "annotations": {"summary": "Run uses its GPUs at 20%.", "description": 'GPUs "idle"\n<!here> & co',
                        "runbook_url": "https://oppen.example.com/infra/monitoring/runbooks.md#oppengpuunderutilized",
                        "value": "20"}})
    return ReceivedEvent(**event_for(alert).model_dump(mode="json"))


SAMPLES = {  # payload -> (event, flow run the server would fetch)
    "budget_warning": lambda: (_run_event("oppen.budget.warning", {
        "scope": "team vision", "amount_usd": 100.0, "used_usd": 79.5, "request_usd": 3.25, "fraction": 0.8261},
        {"prefect": f"{UI}/runs/flow-run/{RUN_ID}", "mlflow": f"{MLFLOW_UI}/#/experiments/1/runs/abc123"}), _flow_run([])),
    "budget_refused_or_stopped": lambda: (_run_event("oppen.budget.stopped", {
        "reason": 'cap "reached"\nat epoch 3', "cost_usd": 0.000291, "cap_usd": 0.0005, "budget_fraction": 0.97}), _flow_run([])),
    "run_failed": lambda: (_flow_run_event("Crashed", message='Pod "evicted":\nOOMKilled <!here>', state_type="CRASHED"),
                           _flow_run(["training", "mnist", "mlflow:1/abc123"])),
    "gpu_underutilized": lambda: (_run_event("oppen.gpu.underutilized", {
        "gpu_utilization": 0.21, "threshold": 0.4, "gpus": 2, "gpu_type": "NVIDIA-A100-SXM4-80GB",
        "advice": 'use 1 GPU: saves about $4.10 on a run like this ("measured")', "saving_usd": 4.1}), _flow_run([])),
    "training_slow": lambda: (_run_event("oppen.training.slow", {
        "epoch": 3, "epoch_seconds": 250.0, "expected_seconds": 100.0, "ratio": 2.5}), _flow_run([])),
    "late_run": lambda: (_flow_run_event("Late", state_type="SCHEDULED", message=""), _flow_run([])),
    "pod_unschedulable": lambda: (_flow_run_event("Unschedulable.InsufficientResources", state_type="PENDING",
                                                  message="No node has the free GPUs"), _flow_run([])),
    "alert": lambda: (_alert_event(), _flow_run([])),
}


def _render(template: str, event: ReceivedEvent, flow_run, automation: ServerAutomation, variables: dict) -> dict:
    register_user_template_filters(all_filters)  # as the server's actions do before rendering
    with temporary_settings({PREFECT_UI_URL: UI}):
        text = render_user_template_sync(template, {"event": event, "flow_run": flow_run, "automation": automation,
                                                    "variables": {"oppen_automations": variables}})
    return json.loads(text)


def _slack_payloads(spec) -> dict[str, str]:
    """Payload name -> the automation that posts it."""
    return {action.slack: automation.name for automation in spec.automations
            for action in automation.actions if isinstance(action, SlackAction)}


def _rendered(spec, server_automations, payload: str) -> tuple[dict, dict[str, str], dict[str, str]]:
    """The message for the payload's sample, its fields (label -> text) and its buttons (label -> URL)."""
    event, flow_run = SAMPLES[payload]()
    message = _render(spec.payload_template(payload), event, flow_run,
                      server_automations[_slack_payloads(spec)[payload]], template_variables(spec, BOT, MLFLOW_UI))
    fields = {f["text"].split("\n", 1)[0].strip("*"): f["text"].split("\n", 1)[1]
              for block in message["blocks"] if block["type"] == "section" for f in block.get("fields", [])}
    buttons = {e["text"]["text"]: e["url"] for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]}
    return message, fields, buttons


def test_every_payload_has_a_sample(spec):
    assert set(_slack_payloads(spec)) == set(SAMPLES)


@pytest.mark.parametrize("payload", sorted(SAMPLES))
def test_payload_renders_to_block_kit(spec, server_automations, payload):
    message, fields, buttons = _rendered(spec, server_automations, payload)
    SlackMessage(text=message["text"], blocks=message["blocks"])  # Slack's limits, as oppen/notify checks them
    event, _ = SAMPLES[payload]()
    assert message["channel"] == ("#vision-runs" if event.resource.get("oppen.team") == "vision" else "#ml-runs")
    assert message["blocks"][0]["type"] == "header"
    assert "Run" in fields and "Status" in fields
    # Slack reads `<!channel>` as a mention in mrkdwn and in the fallback text, not in a plain-text header.
    mrkdwn = json.dumps([message["text"], *(b for b in message["blocks"] if b["type"] != "header")])
    assert "<!" not in mrkdwn and "&lt;!channel&gt;" in mrkdwn
    assert "\n" not in message["blocks"][0]["text"]["text"]
    assert buttons["Prefect run"] == f"{UI}/runs/flow-run/{RUN_ID}"


def test_payloads_show_the_figures(spec, server_automations):
    message, fields, buttons = _rendered(spec, server_automations, "budget_warning")
    assert fields["Budget used"] == "82.6%" and fields["This run may cost"] == "$3.25"
    assert fields["Team / experiment"] == "vision / mnist" and buttons["MLflow run"].endswith("/runs/abc123")
    message, fields, _ = _rendered(spec, server_automations, "budget_refused_or_stopped")
    assert fields["Cost vs cap"] == "$0.000291 of $0.000500" and fields["Budget used"] == "97.0%"
    assert message["blocks"][1]["text"]["text"] == 'cap "reached"\nat epoch 3'
    message, fields, buttons = _rendered(spec, server_automations, "run_failed")
    assert fields["Status"] == "Crashed" and fields["Deployment"] == "local"
    assert message["blocks"][1]["text"]["text"] == 'Pod "evicted":\nOOMKilled &lt;!here&gt;'
    assert buttons["MLflow run"] == f"{MLFLOW_UI}/#/experiments/1/runs/abc123"  # from the flow run's mlflow: tag
    message, fields, _ = _rendered(spec, server_automations, "gpu_underutilized")
    assert fields["GPU utilisation"] == "21.0% (threshold 40.0%)" and fields["Could save"] == "$4.10"
    assert message["blocks"][1]["text"]["text"] == 'use 1 GPU: saves about $4.10 on a run like this ("measured")'
    _, fields, _ = _rendered(spec, server_automations, "training_slow")
    assert fields["Slower by"] == "2.5×" and fields["Epoch"] == "3"
    message, _, _ = _rendered(spec, server_automations, "late_run")
    assert "within 10 minutes" in message["blocks"][1]["text"]["text"]
    _, fields, _ = _rendered(spec, server_automations, "pod_unschedulable")
    assert fields["Diagnosis"] == "Unschedulable.InsufficientResources" and fields["Job"] == "cluster:oppen:train-abc"


def test_webhook_mode_has_no_channel_and_missing_figures_are_left_out(spec, server_automations):
    webhook = SlackTarget("webhook", "http://slack.test/services/T/B/X", {})
    event = _run_event("oppen.budget.refused", {"reason": "over budget", "stage": "precheck", "quote_usd": None})
    message = _render(spec.payload_template("budget_refused_or_stopped"), event, None,
                      server_automations["oppen: budget refused or stopped"],
                      template_variables(spec, webhook, None))
    assert "channel" not in message
    fields = [f["text"] for b in message["blocks"] if b["type"] == "section" for f in b.get("fields", [])]
    assert not any(text.startswith("*Quote*") for text in fields)
    assert any("refused at precheck" in text for text in fields)


# --- a bad file: one sentence ---------------------------------------------------------------------


def _variant(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(DEFAULT_FILE.read_text())
    edit(raw)
    path = tmp_path / "automations.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BAD = {
    "unknown key": (lambda raw: raw["automations"][0].update(colour="red"), "automations.0.colour: Extra inputs"),
    "misspelt trigger field": (lambda raw: raw["automations"][0]["trigger"].update(expects=["x"]),
                               "the trigger has no field 'expects'"),
    "unknown setting": (lambda raw: raw["automations"][4]["trigger"].update(within={"minutes": "$late_after"}),
                        "refers to $late_after, which is not a setting"),
    "missing payload": (lambda raw: raw["payloads"].pop("late_run"), "'late_run' is not among the payloads"),
    "broken template": (lambda raw: raw["payloads"].update(late_run="{{ post( }}"), "payload 'late_run'"),
    "cloud-only trigger": (lambda raw: raw["automations"][0].update(trigger={"posture": "Metric"}),
                           "metric triggers work only on Prefect Cloud"),
    "unknown action field": (lambda raw: raw["automations"][4]["actions"][0]["prefect"].update(reason="x"),
                             "a change-flow-run-state action has no field 'reason'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_file_is_one_sentence(tmp_path, case, capsys):
    edit, expected = BAD[case]
    path = _variant(tmp_path, edit)
    with pytest.raises(AutomationsFileError) as raised:
        load_automations_file(path)
    assert expected in str(raised.value) and "\n" not in str(raised.value)
    assert main(["apply", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err


def test_bad_settings_and_yaml_are_one_sentence(tmp_path, capsys):
    with pytest.raises(AutomationsFileError, match=r"settings.late_after_minutes: must be at least 10 seconds"):
        load_automations_file(overrides={"late_after_minutes": 0.1})  # Prefect's 10 s floor for proactive windows
    with pytest.raises(AutomationsFileError, match="unknown setting 'late_minutes'"):
        load_automations_file(overrides={"late_minutes": 5})
    broken = tmp_path / "broken.yaml"
    broken.write_text(textwrap.dedent("""\
        automations:
          - name: "oppen: x"
            trigger: {expect: [a
        """))
    assert main(["apply", "--file", str(broken)]) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err
    assert main(["apply", "--file", str(tmp_path / "nowhere.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["apply", "--set", "pause_deployment_on_refusal"]) == 2
    assert "--set takes name=value" in capsys.readouterr().err
