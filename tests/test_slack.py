"""The Slack adapter against a local fake Slack: what it posts, how it retries, and that Slack's failures
(500, 429, a hang, a revoked credential) never fail or hold up the caller for longer than the deadline."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from prefect.blocks.system import Secret
from prefect.cache_policies import NONE
from pydantic import SecretStr, ValidationError
from slack_sdk.http_retry.request import HttpRequest
from slack_sdk.http_retry.response import HttpResponse
from slack_sdk.http_retry.state import RetryState

import tasks.slack as slack_module
from oppen.cost.budgets import BudgetsFile, apply_budgets, load_budgets
from oppen.cost.ledger import Ledger
from oppen.events import NOTIFICATION_FAILED, RunEventContext
from oppen.local_stack import free_port
from oppen.notify.blocks import RunFacts, SlackMessage, run_message
from oppen.settings import load_settings
from tasks.slack import (
    REDACTED,
    Delivery,
    SlackCredentials,
    SlackNotifier,
    _Post,
    _RateLimitRetry,
    channels_from_budgets,
    notify_slack,
    record_failure,
    resolve_credentials,
    scrub,
)
from tests.slack_server import INVALID_AUTH, OK, FakeSlack, hang, rate_limited, server_error

TOKEN = "xoxb-1111-2222-recognisable-bot-token"
HOOK_PATH = "/services/T0SECRET/B0SECRET/recognisable-webhook-secret"

FACTS = RunFacts(
    workload="train-mnist", run_name="brisk-otter", flow_run_id="0b7c-run", status="completed",
    headline="Reached 99.12% test accuracy.", team="vision", experiment="mnist", cost_usd=0.000532, cap_usd=0.5,
    budget_fraction=0.123, metric={"name": "test_accuracy", "value": 0.9912},
    prefect_url="http://127.0.0.1:4200/runs/flow-run/0b7c-run", mlflow_url="http://127.0.0.1:5000/#/runs/abc",
)


def missing_block(name: str):
    raise ValueError(f"Unable to find block document named {name} for block type secret")


@pytest.fixture(autouse=True)
def no_slack_configured(monkeypatch):
    """Nothing from the developer's shell, and no Prefect API: a Secret block lookup finds nothing."""
    for key in ("BOT_TOKEN", "WEBHOOK_URL", "CHANNEL", "API_URL", "TOKEN_BLOCK", "WEBHOOK_BLOCK", "DEADLINE_S"):
        monkeypatch.delenv(f"OPPEN_SLACK_{key}", raising=False)
    monkeypatch.setattr(Secret, "load", missing_block)


@pytest.fixture
def fake_slack():
    with FakeSlack() as server:
        yield server


@pytest.fixture
def run_log(monkeypatch, caplog):
    """The task's run logger, as a plain logger caplog sees (no Prefect run context needed)."""
    logger = logging.getLogger("test.flow-run")
    monkeypatch.setattr(slack_module, "get_run_logger", lambda: logger)
    caplog.set_level(logging.DEBUG)
    return caplog


def configure(monkeypatch, **values) -> SlackNotifier:
    for key, value in values.items():
        monkeypatch.setenv(f"OPPEN_SLACK_{key.upper()}", str(value))
    return SlackNotifier(load_settings(), {"vision": "#vision-ml"})


def bot(monkeypatch, server: FakeSlack, **values) -> SlackNotifier:
    return configure(monkeypatch, bot_token=TOKEN, api_url=server.api_url, **values)


def hook_url(server: FakeSlack) -> str:
    return f"http://127.0.0.1:{server.port}{HOOK_PATH}"


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


def join_senders(timeout: float = 10) -> None:
    """Waits for every abandoned sender thread to end, so a test can check what it did afterwards."""
    for thread in threading.enumerate():
        if thread.name == "oppen-slack-post":
            thread.join(timeout)
            assert not thread.is_alive()


# --- what is posted, where -------------------------------------------------------------------


def test_bot_mode_posts_the_run_message_to_the_teams_channel(monkeypatch, fake_slack):
    message = run_message(FACTS)
    delivery = bot(monkeypatch, fake_slack).post(message, team="vision")
    assert delivery.status == "sent" and delivery.channel == "#vision-ml" and delivery.attempts == 1
    assert delivery.error is None
    (request,) = fake_slack.requests
    assert request.path == "/api/chat.postMessage" and request.headers["Authorization"] == f"Bearer {TOKEN}"
    body = request.body
    assert body["channel"] == "#vision-ml" and body["text"] == message.text and body["unfurl_links"] is False
    blocks = body["blocks"]
    assert blocks[0]["text"]["text"] == ":white_check_mark: train-mnist: brisk-otter completed"
    fields = [field["text"] for block in blocks for field in block.get("fields", [])]
    assert "*Status*\ncompleted" in fields and "*Cost*\n$0.000532 of $0.50 cap" in fields
    assert "*Budget*\n12.3% used" in fields and "*test_accuracy*\n99.12%" in fields
    links = [button["url"] for block in blocks if block["type"] == "actions" for button in block["elements"]]
    assert links == [FACTS.prefect_url, FACTS.mlflow_url]
    assert fake_slack.messages() == [body]


def test_a_team_without_a_channel_posts_to_the_default_one(monkeypatch, fake_slack):
    notifier = configure(monkeypatch, bot_token=TOKEN, api_url=fake_slack.api_url.rstrip("/"), channel="#ml-all")
    assert notifier.post(run_message(FACTS), team="default").channel == "#ml-all"
    assert notifier.post(run_message(FACTS)).channel == "#ml-all"
    assert [(r.path, r.body["channel"]) for r in fake_slack.requests] == [("/api/chat.postMessage", "#ml-all")] * 2


def test_webhook_mode_posts_the_blocks_to_the_webhook(monkeypatch, fake_slack):
    notifier = configure(monkeypatch, webhook_url=hook_url(fake_slack))
    delivery = notifier.post(run_message(FACTS), team="vision")
    assert delivery.status == "sent" and delivery.channel == "webhook" and delivery.attempts == 1
    (request,) = fake_slack.requests
    assert request.path == HOOK_PATH and "Authorization" not in request.headers
    assert request.body["blocks"] == run_message(FACTS).blocks


def test_the_bot_token_wins_over_the_webhook(monkeypatch, fake_slack):
    notifier = bot(monkeypatch, fake_slack, webhook_url=hook_url(fake_slack))
    assert notifier.post(run_message(FACTS)).channel == "#ml-runs"
    assert [r.path for r in fake_slack.requests] == ["/api/chat.postMessage"]


# --- channels from the budgets file ----------------------------------------------------------


def test_the_shipped_budgets_file_names_channels_for_vision_and_nlp():
    assert channels_from_budgets(Path("oppen/cost/budgets.yaml")) == {"vision": "#vision-ml", "nlp": "#nlp-ml"}


@pytest.mark.parametrize("channel, valid", [
    ("#vision-ml", True), ("#ml_runs.2", True), ("C0123ABCD9", True), ("G0123ABCD9", True),
    ("vision-ml", False), ("#Vision", False), ("#", False), ("#a b", False), ("C012", False), ("@someone", False),
])
def test_a_team_channel_must_look_like_a_slack_channel(channel, valid):
    spec = {"teams": {"ml": {"budget": {"amount_usd": 10.0}, "slack_channel": channel}}}
    if valid:
        assert BudgetsFile.model_validate(spec).teams["ml"].slack_channel == channel
    else:
        with pytest.raises(ValidationError, match="slack_channel"):
            BudgetsFile.model_validate(spec)


def test_a_channel_is_not_a_budget_the_ledger_is_the_same_with_or_without_it(tmp_path):
    plain = {"ml": {"budget": {"amount_usd": 10.0}, "experiments": {"mnist": {"amount_usd": 2.0}}}}
    with_channel = {"ml": {**plain["ml"], "slack_channel": "#ml"}}
    ledgers = []
    for name, teams in (("plain", plain), ("channel", with_channel)):
        ledger = Ledger(f"sqlite:///{tmp_path / name}.db")
        ledger.create_schema()
        spec = BudgetsFile.model_validate({"teams": teams})
        changes = apply_budgets(ledger, spec)
        budgets = [{k: v for k, v in row.items() if k != "updated_at"} for row in ledger.budgets_of("ml")]
        ledgers.append((changes, budgets, apply_budgets(ledger, spec)))
        ledger.dispose()
    assert ledgers[0] == ledgers[1] and len(ledgers[0][0]) == 3 and ledgers[1][2] == []
    assert set(load_budgets().teams) == {"default", "vision", "nlp"}


def test_the_task_posts_to_the_channel_its_budgets_file_names(monkeypatch, fake_slack, run_log, tmp_path):
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("teams:\n  ml:\n    budget: {amount_usd: 10.0}\n    slack_channel: C0123ABCD9\n")
    monkeypatch.setenv("OPPEN_BUDGETS_FILE", str(budgets))
    configure(monkeypatch, bot_token=TOKEN, api_url=fake_slack.api_url)
    delivery = notify_slack.fn(run_message(FACTS), team="ml")
    assert delivery.status == "sent" and delivery.channel == "C0123ABCD9"
    assert fake_slack.requests[0].body["channel"] == "C0123ABCD9"
    assert "Slack message posted to C0123ABCD9 (1 attempt(s)" in run_log.text


# --- Slack failing ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_429_is_retried_after_its_retry_after(monkeypatch, fake_slack):
    fake_slack.script(rate_limited(1), OK)
    delivery = bot(monkeypatch, fake_slack).post(run_message(FACTS), team="vision")
    assert delivery.status == "sent" and delivery.attempts == 2
    first, second = fake_slack.requests
    assert second.at - first.at >= 1.0
    assert len(fake_slack.messages()) == 1


@pytest.mark.slow
def test_a_500_is_retried_with_backoff(monkeypatch, fake_slack):
    fake_slack.script(server_error(500), server_error(503), OK)
    delivery = bot(monkeypatch, fake_slack).post(run_message(FACTS), team="vision")
    assert delivery.status == "sent" and delivery.attempts == 3 and len(fake_slack.requests) == 3


@pytest.mark.slow
def test_a_persistent_500_fails_the_message_not_the_run_and_is_recorded(monkeypatch, fake_slack, run_log):
    fake_slack.default = server_error(500)
    configure(monkeypatch, bot_token=TOKEN, api_url=fake_slack.api_url)
    failures: list[Delivery] = []
    delivery, seconds = timed(lambda: notify_slack.fn(run_message(FACTS), team="vision", on_failure=failures.append))
    assert delivery.status == "failed" and delivery.attempts == 3 and len(fake_slack.requests) == 3
    assert delivery.error == "Slack answered 500"
    assert seconds < load_settings().slack_deadline_s + 3
    assert failures == [delivery]
    warnings = [r for r in run_log.records if r.name == "test.flow-run" and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == ["Slack message not delivered: Slack answered 500"]


@pytest.mark.slow
def test_a_hanging_slack_delays_the_caller_by_the_deadline_at_most_and_is_never_posted_twice(monkeypatch, fake_slack,
                                                                                           run_log):
    fake_slack.default = hang(30)
    configure(monkeypatch, bot_token=TOKEN, api_url=fake_slack.api_url, deadline_s=2)
    failures: list[Delivery] = []
    delivery, seconds = timed(lambda: notify_slack.fn(run_message(FACTS), team="vision", on_failure=failures.append))
    assert delivery.status == "failed" and delivery.error == "no answer from Slack within 2 s"
    assert delivery.channel == "#vision-ml"
    assert 2 <= seconds < 2 + 2
    assert failures == [delivery] and "Slack message not delivered: no answer from Slack within 2 s" in run_log.text
    fake_slack.release()  # the hung connection closes: slack-sdk would retry it, but the caller has stopped waiting
    join_senders()
    assert len(fake_slack.requests) == 1


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(monkeypatch, fake_slack):
    fake_slack.script(rate_limited(30))
    delivery, seconds = timed(lambda: bot(monkeypatch, fake_slack).post(run_message(FACTS), team="vision"))
    assert delivery.status == "failed" and delivery.attempts == 1 and len(fake_slack.requests) == 1
    assert delivery.error == ("Slack answered 429: ratelimited; "
                              "not retried: Retry-After 30 s would pass the 10 s deadline")
    assert seconds < 3


def test_a_retry_after_that_is_no_number_is_not_retried():
    post = _Post(10)
    handler = _RateLimitRetry(max_retry_count=2)
    handler.post = post
    request = HttpRequest(method="POST", url="http://x", headers={})
    for headers, retried in (({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, False), ({}, False),
                             ({"retry-after": "2"}, True)):
        response = HttpResponse(status_code=429, headers=headers)
        assert handler.can_retry(state=RetryState(), request=request, response=response) is retried
    assert post.gave_up == "Slack's 429 carried no usable Retry-After"


def test_a_revoked_token_fails_at_once_without_retries(monkeypatch, fake_slack):
    fake_slack.default = INVALID_AUTH
    delivery = bot(monkeypatch, fake_slack).post(run_message(FACTS))
    assert delivery.status == "failed" and delivery.error == "Slack answered 200: invalid_auth"
    assert delivery.attempts == 1 and len(fake_slack.requests) == 1


def test_a_revoked_webhook_fails_at_once_without_retries(monkeypatch, fake_slack):
    fake_slack.default = INVALID_AUTH
    delivery = configure(monkeypatch, webhook_url=hook_url(fake_slack)).post(run_message(FACTS))
    assert delivery.status == "failed" and delivery.error == "Slack answered 403: invalid_token"
    assert len(fake_slack.requests) == 1


def test_not_configured_is_skipped_with_one_line_and_no_request(monkeypatch, fake_slack, run_log):
    looked_up: list[str] = []
    monkeypatch.setattr(Secret, "load", lambda name: looked_up.append(name) or missing_block(name))
    configure(monkeypatch, api_url=fake_slack.api_url)
    failures: list[Delivery] = []
    delivery = notify_slack.fn(run_message(FACTS), team="vision", on_failure=failures.append)
    assert delivery.status == "skipped" and delivery.attempts == 0 and not failures
    assert looked_up == ["oppen-slack-bot-token", "oppen-slack-webhook-url"]
    assert fake_slack.requests == []
    ours = [r for r in run_log.records if r.name == "test.flow-run"]
    assert [(r.levelname, r.getMessage()) for r in ours] == [
        ("INFO", "Slack is not configured (no bot token or webhook URL): message not posted")]


def test_the_task_never_raises_not_even_on_bad_settings_or_a_failing_recorder(monkeypatch, run_log):
    assert notify_slack.retries == 0 and notify_slack.cache_policy is NONE
    monkeypatch.setenv("OPPEN_SLACK_DEADLINE_S", "forever")
    delivery = notify_slack.fn(run_message(FACTS), on_failure=lambda d: 1 / 0)
    assert delivery.status == "failed" and delivery.error.startswith("ValidationError")
    assert "Slack message not delivered: ValidationError" in run_log.text
    assert "Slack failure not recorded: ZeroDivisionError" in run_log.text


def test_record_failure_emits_the_catalogued_event_on_the_run(monkeypatch):
    sent = []
    monkeypatch.setattr("prefect.events.emit_event", lambda **event: sent.append(event))
    context = RunEventContext("0b7c-run", "vision", "mnist", "train-mnist",
                              links={"Prefect": "http://127.0.0.1:4200/runs/flow-run/0b7c-run"})
    delivery = Delivery(status="failed", channel="#vision-ml", attempts=3, seconds=2.1, error="Slack answered 500")
    record_failure(context, delivery, "run")
    (event,) = sent
    assert event["event"] == NOTIFICATION_FAILED and event["resource"]["prefect.resource.id"] == "oppen.run.0b7c-run"
    assert event["payload"] == {"channel": "#vision-ml", "error": "Slack answered 500", "message_kind": "run",
                                "links": context.links}


# --- credentials -----------------------------------------------------------------------------


class StoredSecret:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def blocks_holding(**stored):
    def load(name):
        if name not in stored:
            missing_block(name)
        return StoredSecret(stored[name])
    return load


def test_credentials_come_from_secret_blocks_when_the_environment_has_none(monkeypatch):
    monkeypatch.setattr(Secret, "load", blocks_holding(**{"oppen-slack-webhook-url": "https://hooks.example/x/y"}))
    credentials = resolve_credentials(load_settings())
    assert credentials.mode == "webhook" and credentials.source == "secret block"
    assert credentials.webhook_url.get_secret_value() == "https://hooks.example/x/y"

    monkeypatch.setenv("OPPEN_SLACK_TOKEN_BLOCK", "team-token")
    stored = {"team-token": TOKEN, "oppen-slack-webhook-url": "https://h/x"}
    monkeypatch.setattr(Secret, "load", blocks_holding(**stored))
    credentials = resolve_credentials(load_settings())
    assert credentials.mode == "bot" and credentials.bot_token.get_secret_value() == TOKEN


def test_the_environment_wins_over_the_secret_block(monkeypatch):
    monkeypatch.setattr(Secret, "load", blocks_holding(**{"oppen-slack-bot-token": "xoxb-from-block"}))
    monkeypatch.setenv("OPPEN_SLACK_BOT_TOKEN", TOKEN)
    credentials = resolve_credentials(load_settings())
    assert credentials.source == "environment" and credentials.bot_token.get_secret_value() == TOKEN


def test_an_unreadable_block_turns_slack_off_with_a_warning_that_quotes_no_secret(monkeypatch, caplog):
    def broken(name):
        raise RuntimeError(f"server said no to {TOKEN}")
    monkeypatch.setattr(Secret, "load", broken)
    credentials = resolve_credentials(load_settings())
    assert credentials.mode == "none"
    assert "Slack secret block 'oppen-slack-bot-token' unreadable (RuntimeError)" in caplog.text
    assert TOKEN not in caplog.text
    monkeypatch.setattr(Secret, "load", blocks_holding(**{"oppen-slack-bot-token": {"not": "text"}}))
    assert resolve_credentials(load_settings()).mode == "none"


def test_a_hanging_secret_lookup_is_bounded_by_the_deadline_too(monkeypatch, fake_slack):
    released = threading.Event()
    monkeypatch.setattr(Secret, "load", lambda name: released.wait(30) and missing_block(name))
    notifier = configure(monkeypatch, api_url=fake_slack.api_url, deadline_s=1)
    try:
        delivery, seconds = timed(lambda: notifier.post(run_message(FACTS)))
    finally:
        released.set()
    assert delivery.status == "failed" and seconds < 1 + 2
    join_senders()


# --- secrets never shown ---------------------------------------------------------------------


def test_scrub_removes_the_token_the_webhook_url_and_its_path():
    url = f"https://hooks.slack.com{HOOK_PATH}"
    text = f"POST {url} failed; path {HOOK_PATH}; host hooks.slack.com{HOOK_PATH}; Bearer {TOKEN}."
    scrubbed = scrub(text, [TOKEN, url])
    assert TOKEN not in scrubbed and HOOK_PATH not in scrubbed and "recognisable" not in scrubbed
    assert scrubbed == f"POST {REDACTED} failed; path {REDACTED}; host {REDACTED}; Bearer {REDACTED}."
    assert scrub("nothing secret", [TOKEN, ""]) == "nothing secret"


@pytest.mark.slow
def test_secrets_never_appear_in_logs_errors_or_reprs(monkeypatch, fake_slack, run_log):
    # run_log captures everything from DEBUG up: slack-sdk's most talkative, with its request lines and URLs
    closed = f"http://127.0.0.1:{free_port()}{HOOK_PATH}"  # nothing listens: connection refused, retried
    deliveries = []
    configure(monkeypatch, webhook_url=closed)
    deliveries.append(notify_slack.fn(run_message(FACTS)))
    fake_slack.default = INVALID_AUTH
    monkeypatch.delenv("OPPEN_SLACK_WEBHOOK_URL")
    notifier = bot(monkeypatch, fake_slack)
    deliveries.append(notify_slack.fn(run_message(FACTS)))
    deliveries.append(notifier.post(run_message(FACTS)))
    assert [d.status for d in deliveries] == ["failed"] * 3
    assert fake_slack.requests[0].headers["Authorization"] == f"Bearer {TOKEN}"  # the token was in use
    assert deliveries[0].attempts == 3  # the refused connection was retried, and slack-sdk logged its URL
    assert f"Going to retry the same request: POST {REDACTED}" in run_log.text
    credentials = SlackCredentials(bot_token=SecretStr(TOKEN), webhook_url=SecretStr(closed))
    shown = "\n".join([run_log.text, *(d.model_dump_json() for d in deliveries), repr(notifier), str(notifier),
                       repr(notifier.credentials()), repr(credentials), str(credentials)])
    for secret in (TOKEN, closed, HOOK_PATH, "recognisable"):
        assert secret not in shown


def test_a_message_is_posted_as_built(monkeypatch, fake_slack):
    """Custom messages (an event, a report) go through the same path; the fake records exactly what was sent."""
    message = SlackMessage(text="plain & simple", blocks=[{"type": "divider"}])
    assert bot(monkeypatch, fake_slack).post(message).status == "sent"
    assert fake_slack.wait_for_requests(1, timeout=5)[0].body["blocks"] == [{"type": "divider"}]
