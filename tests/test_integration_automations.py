"""automations.yaml applied to a real `prefect server start`, firing on events of the exact shapes Oppen and
prefect-kubernetes' observer send, and posting to a fake Slack (tests/slack_server.py) through the Webhook
block the command keeps. One server for the module; proactive windows shortened to 12 s."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.events import Event
from prefect.states import Crashed, Failed, Pending, Running, Scheduled

from oppen.automations import DEFAULT_FILE, BLOCK_NAME, apply_automations, main
from tests.slack_server import FakeSlack
from tests.slack_stack import slack_stack
from tests.stack import PrefectStack

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TOKEN = "xoxb-test-secret-token"
MLFLOW_UI = "http://mlflow.test"
# 12 s windows (Prefect's floor for a proactive trigger is 10 s); pausing on refusal on, to see it happen.
SHORT = {"late_after_minutes": 0.2, "pending_for_minutes": 0.2, "pause_deployment_on_refusal": True}
SERVER_ENV = {
    "PREFECT_SERVER_EVENTS_PROACTIVE_GRANULARITY": "PT1S",  # proactive triggers looked at every second (default 5)
    "PREFECT_SERVER_SERVICES_LATE_RUNS_LOOP_SECONDS": "1",  # a past-due run is marked Late within ~2 s
    "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": "1",
}
LATENCIES: dict[str, float] = {}  # emit -> fake Slack, printed at the end (pytest -s)


@pytest.fixture(scope="module")
def slack():
    with FakeSlack() as fake:
        yield fake


@pytest.fixture(scope="module")
def stack(tmp_path_factory, slack):
    try:
        with slack_stack(tmp_path_factory.mktemp("automations"), slack.api_url, TOKEN, server_env=SERVER_ENV,
                         env={"OPPEN_MLFLOW_UI_URL": MLFLOW_UI}) as stack:
            yield stack
    finally:
        if LATENCIES:
            print("\nemit -> fake Slack:", ", ".join(f"{k} {v:.2f} s" for k, v in LATENCIES.items()))


@pytest.fixture(scope="module")
def applied(stack):
    return apply_automations(DEFAULT_FILE, overrides=SHORT)


@pytest.fixture(scope="module")
def deployment(stack):
    """A `training`-tagged deployment on a pool no worker polls: its runs stay where the test puts them."""
    async def create():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="nobody-polls", type="process"))
            flow_id = await client.create_flow_from_name("train-mnist")
            return await client.create_deployment(flow_id, "idle", work_pool_name="nobody-polls",
                                                  tags=["training", "mnist"], entrypoint="flows/train_mnist.py:train_mnist")
    return asyncio.run(create())


# --- helpers ----------------------------------------------------------------------------------------


def _run(coroutine):
    return asyncio.run(coroutine)


async def _call(method, *args, **kwargs):
    async with get_client() as client:
        return await getattr(client, method)(*args, **kwargs)


def _flow_run(deployment_id, name: str, state, tags=()):
    return _run(_call("create_flow_run_from_deployment", deployment_id, name=name, state=state, tags=list(tags)))


def _post(stack: PrefectStack, *events: Event) -> float:
    """POST /api/events (what `prefect event emit` and the observer's client reach); returns when it was sent."""
    sent = time.monotonic()
    response = httpx.post(f"{stack.api_url}/events", json=[event.model_dump(mode="json") for event in events], timeout=30)
    response.raise_for_status()
    return sent


def _wait(stack: PrefectStack, predicate, what: str, timeout: float = 90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := predicate():
            return found
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}\n{stack.log('server')}")


def _slack_message(stack, slack, header_part: str):
    def find():
        return next((r for r in slack.requests if isinstance(r.body, dict) and r.body.get("blocks")
                     and header_part in r.body["blocks"][0]["text"]["text"]), None)
    return _wait(stack, find, f"a Slack message with {header_part!r}")


def _fields(message: dict) -> dict[str, str]:
    return {f["text"].split("\n", 1)[0].strip("*"): f["text"].split("\n", 1)[1]
            for block in message["blocks"] if block["type"] == "section" for f in block.get("fields", [])}


def _buttons(message: dict) -> dict[str, str]:
    return {e["text"]["text"]: e["url"] for b in message["blocks"] if b["type"] == "actions" for e in b["elements"]}


def _automations(stack) -> dict[str, tuple[str, str]]:
    """name -> (automation id, trigger id), as the server stores them."""
    response = httpx.post(f"{stack.api_url}/automations/filter", json={"limit": 200}, timeout=30)
    response.raise_for_status()
    return {a["name"]: (a["id"], a["trigger"]["id"]) for a in response.json()}


def _run_event(name: str, flow_run_id, payload: dict, team="vision", deployment_id=None, run_name="wise-otter"):
    """As oppen/events.py's RunEventContext builds it."""
    related = [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]
    if deployment_id:
        related.append({"prefect.resource.id": f"prefect.deployment.{deployment_id}",
                        "prefect.resource.role": "deployment"})
    related += [{"prefect.resource.id": f"oppen.team.{team}", "prefect.resource.role": "team"},
                {"prefect.resource.id": "oppen.experiment.mnist", "prefect.resource.role": "experiment"}]
    resource = {"prefect.resource.id": f"oppen.run.{flow_run_id}", "oppen.team": team, "oppen.experiment": "mnist",
                "oppen.workload": "train-mnist", "prefect.resource.name": run_name}
    return Event(event=name, resource=resource, related=related, payload={**payload, "links": {}})


def _pod_event(phase: str, pod_uid: str, flow_run, deployment_id, diagnosis: str | None = None,
               occurred: datetime | None = None, follows=None) -> Event:
    """As prefect-kubernetes' observer sends it (observer.py, _replicate_pod_event and its related resources)."""
    resource = {"prefect.resource.id": f"prefect.kubernetes.pod.{pod_uid}",
                "prefect.resource.name": f"{flow_run.name}-abcde", "kubernetes.namespace": "oppen"}
    if diagnosis:
        resource["kubernetes.diagnosis"] = diagnosis
    related = [
        {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
         "prefect.resource.name": flow_run.name},
        {"prefect.resource.id": f"prefect.deployment.{deployment_id}", "prefect.resource.role": "deployment",
         "prefect.resource.name": "idle"},
        {"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}", "prefect.resource.role": "flow",
         "prefect.resource.name": "train-mnist"},
        {"prefect.resource.id": f"prefect.worker.kubernetes.gpu-worker-1", "prefect.resource.role": "worker",
         "prefect.resource.name": "gpu-worker-1", "prefect.worker-type": "kubernetes", "prefect.version": "0.8.0"},
    ]
    return Event(event=f"prefect.kubernetes.pod.{phase}", resource=resource, related=related,
                 occurred=occurred or datetime.now(timezone.utc), follows=follows)


# --- applying -------------------------------------------------------------------------------------


def test_apply_creates_everything_then_changes_nothing(stack, applied, capsys):
    assert {change.action for change in applied} == {"created"}
    assert ("block oppen-slack", "created") in [(c.name, c.action) for c in applied]
    before = _automations(stack)
    assert len([name for name in before if name.startswith("oppen: ")]) == 12

    assert main(["apply", *[arg for k, v in SHORT.items() for arg in ("--set", f"{k}={v}")]]) == 0
    out = capsys.readouterr().out
    assert out.strip() and all(line.startswith("unchanged ") for line in out.splitlines()), out
    assert TOKEN not in out and "chat.postMessage" in out  # which mode, never the credential
    assert _automations(stack) == before  # same automations, same trigger ids: proactive windows kept


def test_a_changed_setting_updates_only_the_automation_that_uses_it(stack, applied):
    before = _automations(stack)
    changes = apply_automations(DEFAULT_FILE, overrides={**SHORT, "pending_for_minutes": 0.25})
    updated = [(c.name, c.detail) for c in changes if c.action != "unchanged"]
    assert updated == [("oppen: pod unschedulable too long", "actions, description, trigger")]
    after = _automations(stack)
    assert {n: v for n, v in after.items() if n != updated[0][0]} == {n: v for n, v in before.items() if n != updated[0][0]}
    assert after[updated[0][0]][1] != before[updated[0][0]][1]  # what an update costs: a new trigger id
    restored = apply_automations(DEFAULT_FILE, overrides=SHORT)
    assert [c.name for c in restored if c.action == "updated"] == ["oppen: pod unschedulable too long"]


def test_prune_deletes_stale_oppen_automations_only(stack, applied):
    from prefect.automations import Automation, DoNothing, EventTrigger

    for name in ("oppen: retired", "nightly cleanup"):
        Automation(name=name, trigger=EventTrigger(expect={"x.y"}), actions=[DoNothing()]).create()
    kept = apply_automations(DEFAULT_FILE, overrides=SHORT)
    assert not [c for c in kept if c.action == "deleted"] and "oppen: retired" in _automations(stack)
    pruned = apply_automations(DEFAULT_FILE, prune=True, overrides=SHORT)
    assert [(c.name, c.action) for c in pruned if c.action != "unchanged"] == [("oppen: retired", "deleted")]
    left = _automations(stack)
    assert "oppen: retired" not in left and "nightly cleanup" in left


# --- firing ---------------------------------------------------------------------------------------


def test_budget_warning_posts_block_kit_to_the_teams_channel(stack, slack, applied, deployment):
    run = _flow_run(deployment, "warned-otter", Running())
    sent = _post(stack, _run_event("oppen.budget.warning", run.id, {
        "scope": "team vision", "amount_usd": 100.0, "used_usd": 79.5, "request_usd": 3.25, "fraction": 0.8261},
        run_name="warned-otter"))
    request = _slack_message(stack, slack, "Budget warning: warned-otter")
    LATENCIES["budget warning"] = request.at - sent
    assert request.path == "/api/chat.postMessage" and request.headers["Authorization"] == f"Bearer {TOKEN}"
    message = request.body
    assert message["channel"] == "#vision-runs" and message["text"].startswith(":warning: Budget warning")
    assert _fields(message)["Budget used"] == "82.6%" and _fields(message)["This run may cost"] == "$3.25"
    assert _buttons(message)["Prefect run"].endswith(f"/runs/flow-run/{run.id}")


def test_refused_run_posts_and_pauses_its_deployment(stack, slack, applied):
    async def refusals_deployment():
        async with get_client() as client:
            flow_id = await client.create_flow_from_name("train-lm")
            return await client.create_deployment(flow_id, "refusals", work_pool_name="nobody-polls")
    deployment_id = _run(refusals_deployment())
    run = _flow_run(deployment_id, "refused-otter", Running())
    sent = _post(stack, _run_event("oppen.budget.refused", run.id, {
        "reason": 'budget exhausted: team "vision"\n$100.00 of $100.00', "stage": "precheck", "quote_usd": 2.5},
        team="nlp", deployment_id=deployment_id, run_name="refused-otter"))
    request = _slack_message(stack, slack, "Refused by its budget: refused-otter")
    LATENCIES["budget refused"] = request.at - sent
    assert request.body["channel"] == "#ml-runs"  # a team without its own channel
    assert request.body["blocks"][1]["text"]["text"] == 'budget exhausted: team "vision"\n$100.00 of $100.00'
    assert _fields(request.body)["Quote"] == "$2.50"
    _wait(stack, lambda: _run(_call("read_deployment", deployment_id)).paused, "the deployment to be paused")


def test_budget_stop_posts_cost_against_cap(stack, slack, applied, deployment):
    run = _flow_run(deployment, "stopped-otter", Running())
    _post(stack, _run_event("oppen.budget.stopped", run.id, {
        "reason": "cap reached", "cost_usd": 0.000291, "cap_usd": 0.0005, "budget_fraction": 0.5},
        run_name="stopped-otter"))
    message = _slack_message(stack, slack, "Stopped at its limit: stopped-otter").body
    assert _fields(message)["Cost vs cap"] == "$0.000291 of $0.000500" and _fields(message)["Budget used"] == "50.0%"


def test_failed_and_crashed_training_runs_post_with_prefect_and_mlflow_links(stack, slack, applied, deployment):
    failed = _flow_run(deployment, "failed-otter", Running())
    crashed = _flow_run(deployment, "crashed-otter", Running())
    # What tasks/run_events.py does once the MLflow run opens.
    _run(_call("update_flow_run", failed.id, tags=["training", "mnist", "mlflow:7/0123abcd"]))
    sent = time.monotonic()
    _run(_call("set_flow_run_state", failed.id, Failed(message='loss "nan" at step 12\n<!channel>')))
    _run(_call("set_flow_run_state", crashed.id, Crashed(message="pod OOMKilled")))
    request = _slack_message(stack, slack, "failed-otter Failed")
    LATENCIES["run Failed"] = request.at - sent
    message = request.body
    assert message["blocks"][1]["text"]["text"] == 'loss "nan" at step 12\n&lt;!channel&gt;'
    assert _buttons(message) == {"Prefect run": _buttons(message)["Prefect run"],
                                 "MLflow run": f"{MLFLOW_UI}/#/experiments/7/runs/0123abcd"}
    assert _buttons(message)["Prefect run"].endswith(f"/runs/flow-run/{failed.id}")
    crashed_message = _slack_message(stack, slack, "crashed-otter Crashed").body
    assert _fields(crashed_message)["Status"] == "Crashed" and "MLflow run" not in _buttons(crashed_message)


def test_gpu_underutilized_posts_the_advice(stack, slack, applied, deployment):
    run = _flow_run(deployment, "idle-gpu-otter", Running())
    _post(stack, _run_event("oppen.gpu.underutilized", run.id, {
        "gpu_utilization": 0.21, "threshold": 0.4, "gpus": 2, "gpu_type": "NVIDIA-A100-SXM4-80GB",
        "advice": "use 1 GPU: saves about $4.10 on a run like this", "saving_usd": 4.1}, run_name="idle-gpu-otter"))
    message = _slack_message(stack, slack, "GPUs underused: idle-gpu-otter").body
    assert message["blocks"][1]["text"]["text"] == "use 1 GPU: saves about $4.10 on a run like this"
    assert _fields(message)["GPU utilisation"] == "21.0% (threshold 40.0%)"


def test_slow_training_posts(stack, slack, applied, deployment):
    run = _flow_run(deployment, "slow-otter", Running())
    _post(stack, _run_event("oppen.training.slow", run.id, {
        "epoch": 3, "epoch_seconds": 250.0, "expected_seconds": 100.0, "ratio": 2.5}, run_name="slow-otter"))
    message = _slack_message(stack, slack, "slower than its history: slow-otter").body
    assert _fields(message)["Slower by"] == "2.5×"


def test_a_run_late_too_long_is_cancelled_with_a_reason_and_posted(stack, slack, applied, deployment):
    due = datetime.now(timezone.utc) - timedelta(minutes=1)
    run = _flow_run(deployment, "late-otter", Scheduled(scheduled_time=due))
    # The server's late-runs service marks it Late; 12 s later nobody has taken it.
    message = _slack_message(stack, slack, "Late run cancelled: late-otter").body
    assert "within 0.2 minutes" in message["blocks"][1]["text"]["text"]
    state = stack.final_state(str(run.id), timeout=60)
    assert state.type.value == "CANCELLED" and "Late by more than 0.2 minutes" in state.message


def test_an_unschedulable_pod_cancels_its_run_unless_it_starts_in_time(stack, slack, applied, deployment):
    # Both runs were submitted: Pending, as a worker leaves a run before its pod starts.
    started = _flow_run(deployment, "started-otter", Pending())
    stuck = _flow_run(deployment, "stuck-otter", Pending())

    def unschedulable(run, pod_uid):
        created = datetime.now(timezone.utc)  # the observer stamps Pending events with the pod's creation
        first = _pod_event("pending", pod_uid, run, deployment, occurred=created)
        _post(stack, first, _pod_event("pending", pod_uid, run, deployment, "Unschedulable.InsufficientResources",
                                       occurred=created, follows=first.id))
        _wait(stack, lambda: _run(_call("read_flow_run", run.id)).state.name == "Unschedulable.InsufficientResources",
              f"{run.name} marked unschedulable")

    # The first pod gets a node inside the window: the observer reports it running, the engine starts the run.
    unschedulable(started, "pod-started")
    _post(stack, _pod_event("running", "pod-started", started, deployment))
    _run(_call("set_flow_run_state", started.id, Running()))
    # The second pod never gets one. Its window opens after the first's, so the first, had it fired,
    # would have fired first.
    unschedulable(stuck, "pod-stuck")

    message = _slack_message(stack, slack, "Pod unschedulable, run cancelled: stuck-otter").body
    assert _fields(message)["Diagnosis"] == "Unschedulable.InsufficientResources"
    assert "No node has the free CPU, memory or GPUs" in message["blocks"][1]["text"]["text"]
    state = _wait(stack, lambda: (s := _run(_call("read_flow_run", stuck.id)).state).type.value == "CANCELLING" and s,
                  "the stuck run to be cancelled")
    # No Kubernetes worker here: on a cluster the worker sees Cancelling, deletes the Job (and its pod),
    # and the run ends Cancelled.
    assert "stayed unschedulable for 0.2 minutes" in state.message
    assert _run(_call("read_flow_run", started.id)).state.type.value == "RUNNING"
    assert not [r for r in slack.requests if isinstance(r.body, dict) and "started-otter" in str(r.body)]


def test_switching_to_an_incoming_webhook_changes_the_block_not_the_automations(stack, slack, applied, deployment,
                                                                                monkeypatch):
    before = _automations(stack)
    monkeypatch.delenv("OPPEN_SLACK_BOT_TOKEN")
    monkeypatch.setenv("OPPEN_SLACK_WEBHOOK_URL", slack.webhook_url)
    changes = {c.name: c.action for c in apply_automations(DEFAULT_FILE, overrides=SHORT)}
    assert changes.pop(f"block {BLOCK_NAME}") == "updated" and changes.pop("variable oppen_automations") == "updated"
    assert set(changes.values()) == {"unchanged"} and _automations(stack) == before  # the block keeps its id

    run = _flow_run(deployment, "hooked-otter", Running())
    _post(stack, _run_event("oppen.gpu.underutilized", run.id, {
        "gpu_utilization": 0.1, "threshold": 0.4, "gpus": 1, "advice": "try a smaller GPU"}, run_name="hooked-otter"))
    request = _slack_message(stack, slack, "GPUs underused: hooked-otter")
    assert request.path == "/services/T000/B000/XXXX" and "Authorization" not in request.headers
    assert "channel" not in request.body  # an incoming webhook posts where it was installed
