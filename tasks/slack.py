"""Slack through slack-sdk: a bot token (a channel per team) or an incoming webhook, never failing a run.

A message is posted from a daemon thread that the caller waits for at most `slack_deadline_s`, retries
and Retry-After waits included (slack_retries.py decides whether a retry still fits). An attempt already
in flight at the deadline may still land (once) and is reported failed. The credential comes from
slack_credentials.py, and every error reported here is scrubbed of it.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field
from slack_sdk import WebClient, WebhookClient
from slack_sdk.errors import SlackApiError

from oppen.cost.budgets import load_budgets
from oppen.events import NOTIFICATION_FAILED, RunEventContext, emit_run_event
from oppen.notify.blocks import SlackMessage
from oppen.settings import OppenSettings, load_settings
from tasks.slack_credentials import SlackCredentials, _ScrubbedLogger, resolve_credentials, scrub
from tasks.slack_retries import _Post, _retry_handlers

# Not used here, but importable from tasks.slack as before the split (tests/test_slack.py imports both).
from tasks.slack_credentials import REDACTED  # noqa: F401
from tasks.slack_retries import _RateLimitRetry  # noqa: F401

REQUEST_TIMEOUT_S = 5  # one attempt; Slack answers in well under a second when it is up
MAX_ERROR_CHARS = 300


# --- delivery ---------------------------------------------------------------------------------


class Delivery(BaseModel):
    """What became of one message: sent, failed (after its retries, within the deadline) or skipped (no Slack)."""

    model_config = ConfigDict(frozen=True)

    status: Literal["sent", "failed", "skipped"]
    channel: str | None = Field(None, description="The channel posted to; 'webhook' for a webhook.")
    attempts: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0)
    error: str | None = Field(None, description="Why it failed, scrubbed of the token and the webhook URL.")


# --- the notifier -----------------------------------------------------------------------------


def channels_from_budgets(budgets_file: Path | None = None) -> dict[str, str]:
    """Team → Slack channel, for the teams of the budgets file that name one."""
    return {team: spec.slack_channel for team, spec in load_budgets(budgets_file).teams.items() if spec.slack_channel}


class SlackNotifier:
    """Posts messages to a team's channel (bot token) or to a webhook, each within `slack_deadline_s`."""

    def __init__(self, settings: OppenSettings, channels: Mapping[str, str] | None = None,
                 credentials: SlackCredentials | None = None) -> None:
        self.settings = settings
        self.channels = dict(channels or {})
        self._credentials = credentials  # resolved on first post, inside its deadline (a Secret block is an API call)
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: OppenSettings | None = None) -> SlackNotifier:
        settings = settings or load_settings()
        return cls(settings, channels_from_budgets(settings.budgets_file))

    def __repr__(self) -> str:
        mode = self._credentials.mode if self._credentials else "unresolved"
        return (f"SlackNotifier(mode={mode!r}, default_channel={self.settings.slack_channel!r}, "
                f"channels={self.channels!r})")

    def channel_for(self, team: str | None) -> str:
        return self.channels.get(team or "", self.settings.slack_channel)

    def credentials(self) -> SlackCredentials:
        with self._lock:
            if self._credentials is None:
                self._credentials = resolve_credentials(self.settings)
            return self._credentials

    def post(self, message: SlackMessage, team: str | None = None) -> Delivery:
        """Sent, failed or skipped, within the deadline; never raises."""
        post = _Post(self.settings.slack_deadline_s)
        # The sender runs in the caller's context: Prefect's client and settings live in context variables.
        sender = threading.Thread(target=contextvars.copy_context().run, args=(self._send, post, message, team),
                                  name="oppen-slack-post", daemon=True)
        sender.start()
        sender.join(post.deadline_s)
        outcome = post.abandon()
        if outcome is not None:
            return outcome
        return Delivery(status="failed", channel=post.channel, attempts=post.attempts, seconds=post.elapsed(),
                        error=f"no answer from Slack within {post.deadline_s:g} s")

    def _send(self, post: _Post, message: SlackMessage, team: str | None) -> None:
        secrets: list[str] = []
        try:
            credentials = self.credentials()
            secrets = credentials.secrets()
            if credentials.mode == "none":
                post.finish(Delivery(status="skipped", attempts=0, seconds=post.elapsed()))
                return
            if credentials.mode == "bot":
                error = self._bot(post, message, team, credentials)
            else:
                error = self._webhook(post, message, credentials)
        except Exception as failure:  # anything at all: the run must not see it
            error = f"{type(failure).__name__}: {failure}"
        if error and post.gave_up:
            error = f"{error}; not retried: {post.gave_up}"
        post.finish(Delivery(
            status="failed" if error else "sent", channel=post.channel, attempts=post.attempts,
            seconds=post.elapsed(), error=_clip(scrub(error, secrets)) if error else None,
        ))

    def _bot(self, post: _Post, message: SlackMessage, team: str | None, credentials: SlackCredentials) -> str | None:
        post.channel = self.channel_for(team)
        base_url = self.settings.slack_api_url
        # slack-sdk appends the method name to base_url as it is: ".../api" would post to ".../apichat.postMessage"
        kwargs: dict[str, Any] = {"base_url": base_url.rstrip("/") + "/"} if base_url else {}
        client = WebClient(
            token=credentials.bot_token.get_secret_value(), timeout=REQUEST_TIMEOUT_S,
            retry_handlers=_retry_handlers(post), logger=_sdk_logger(credentials), **kwargs,
        )
        try:
            client.chat_postMessage(channel=post.channel, text=message.text, blocks=message.blocks,
                                    unfurl_links=False, unfurl_media=False)
        except SlackApiError as error:
            answer = error.response.get("error") if isinstance(error.response.data, dict) else None
            if not isinstance(answer, str) or not re.fullmatch(r"[a-z_]{1,60}", answer):
                answer = None  # not one of Slack's error codes: slack-sdk's note on an HTML error page
            return f"Slack answered {error.response.status_code}" + (f": {answer}" if answer else "")
        return None

    def _webhook(self, post: _Post, message: SlackMessage, credentials: SlackCredentials) -> str | None:
        post.channel = "webhook"
        client = WebhookClient(
            url=credentials.webhook_url.get_secret_value(), timeout=REQUEST_TIMEOUT_S,
            retry_handlers=_retry_handlers(post), logger=_sdk_logger(credentials),
        )
        response = client.send(text=message.text, blocks=message.blocks, unfurl_links=False, unfurl_media=False)
        if response.status_code == 200:
            return None
        return f"Slack answered {response.status_code}: {(response.body or '').strip()[:100] or 'no body'}"


def _sdk_logger(credentials: SlackCredentials) -> logging.LoggerAdapter:
    return _ScrubbedLogger(logging.getLogger("slack_sdk"), credentials.secrets())


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


# --- Prefect ----------------------------------------------------------------------------------


@task(name="notify-slack", cache_policy=NONE, retries=0)
def notify_slack(message: SlackMessage, team: str | None = None,
                 on_failure: Callable[[Delivery], None] | None = None) -> Delivery:
    """Post `message` within the deadline; a failure is one warning line and `on_failure`, never the run's failure.

    No Prefect retries: slack-sdk retries inside the deadline, and a task retry would wait on top of it.
    """
    logger = get_run_logger()
    try:
        delivery = SlackNotifier.from_settings().post(message, team)
    except Exception as error:  # unreadable settings or budgets file: still not a reason to fail the run
        delivery = Delivery(status="failed", error=_clip(scrub(f"{type(error).__name__}: {error}", _env_secrets())))
    if delivery.status == "skipped":
        logger.info("Slack is not configured (no bot token or webhook URL): message not posted")
    elif delivery.status == "sent":
        logger.info("Slack message posted to %s (%d attempt(s), %.1f s)",
                    delivery.channel, delivery.attempts, delivery.seconds)
    else:
        logger.warning("Slack message not delivered: %s", delivery.error)
        if on_failure is not None:
            try:
                on_failure(delivery)
            except Exception as error:
                logger.warning("Slack failure not recorded: %s: %s", type(error).__name__, error)
    return delivery


def record_failure(context: RunEventContext, delivery: Delivery, message_kind: str) -> None:
    """`on_failure` for a run's messages: an `oppen.notification.failed` event on the run."""
    emit_run_event(context, NOTIFICATION_FAILED,
                   {"channel": delivery.channel, "error": delivery.error, "message_kind": message_kind})


def _env_secrets() -> list[str]:
    return [value for value in (os.environ.get("OPPEN_SLACK_BOT_TOKEN"), os.environ.get("OPPEN_SLACK_WEBHOOK_URL"))
            if value]
