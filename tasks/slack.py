"""Slack through slack-sdk: a bot token (a channel per team) or an incoming webhook, never failing a run.

A message is posted from a daemon thread that the caller waits for at most `slack_deadline_s`, retries
and Retry-After waits included. slack-sdk's retry handlers decide *what* is retried (connection errors,
429, 500/503); ours decide *whether there is time*: a retry whose wait would end past the deadline is
not made, and none is made once the caller has stopped waiting. So a message is never re-sent after
the deadline; an attempt already in flight at the deadline may still land (once) and is reported failed.

The bot token and the webhook URL (a webhook's URL is its credential) are never logged: errors are
scrubbed of both, and slack-sdk, which logs request URLs, logs through a scrubbing adapter.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from prefect import get_run_logger, task
from prefect.blocks.system import Secret
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from slack_sdk import WebClient, WebhookClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.handler import RetryHandler

from oppen.cost.budgets import load_budgets
from oppen.events import NOTIFICATION_FAILED, RunEventContext, emit_run_event
from oppen.notify.blocks import SlackMessage
from oppen.settings import OppenSettings, load_settings

log = logging.getLogger(__name__)

MAX_RETRIES = 2  # per kind of failure: three attempts at most, all inside the deadline
REQUEST_TIMEOUT_S = 5  # one attempt; Slack answers in well under a second when it is up
# 0.25 s then 0.5 s, plus up to 1 s of jitter each: a 5xx or a dropped connection is retried well
# inside the default 10 s deadline.
BACKOFF = BackoffRetryIntervalCalculator(backoff_factor=0.25)
MAX_ERROR_CHARS = 300
REDACTED = "[redacted]"


# --- credentials ------------------------------------------------------------------------------


class SlackCredentials(BaseModel):
    """A bot token or a webhook URL (the token wins when both are set); repr shows neither."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bot_token: SecretStr | None = None
    webhook_url: SecretStr | None = None
    source: str = Field("none", description="Where they were found: environment, secret block or none.")

    @property
    def mode(self) -> Literal["bot", "webhook", "none"]:
        return "bot" if self.bot_token else "webhook" if self.webhook_url else "none"

    def secrets(self) -> list[str]:
        return [value.get_secret_value() for value in (self.bot_token, self.webhook_url) if value]


def resolve_credentials(settings: OppenSettings) -> SlackCredentials:
    """The environment's value first, else the Prefect Secret block's; the bot token before the webhook."""
    for field, block_name in (("bot_token", settings.slack_token_block),
                              ("webhook_url", settings.slack_webhook_block)):
        value: SecretStr | None = getattr(settings, f"slack_{field}")
        if value and value.get_secret_value():
            return SlackCredentials(**{field: value}, source="environment")
        loaded = _load_secret_block(block_name)
        if loaded:
            return SlackCredentials(**{field: SecretStr(loaded)}, source="secret block")
    return SlackCredentials()


def _load_secret_block(name: str) -> str | None:
    """The block's value; None when it does not exist, or cannot be read (with a warning naming only the block)."""
    try:
        value = Secret.load(name).get()
    except ValueError as error:
        if "Unable to find block document" not in str(error):
            log.warning("Slack secret block %r unreadable (%s); Slack is off", name, type(error).__name__)
        return None
    except Exception as error:  # the API down or misconfigured: Slack is off, the run goes on
        log.warning("Slack secret block %r unreadable (%s); Slack is off", name, type(error).__name__)
        return None
    if not isinstance(value, str) or not value.strip():
        log.warning("Slack secret block %r holds no text value; Slack is off", name)
        return None
    return value.strip()


def scrub(text: str, secrets: Iterable[str]) -> str:
    """`text` without any secret, nor a webhook URL's path (its secret part, as an error may quote it alone)."""
    for secret in secrets:
        if not secret:
            continue
        text = text.replace(secret, REDACTED)
        parts = urlsplit(secret)
        if parts.scheme and len(parts.path) > 1:
            text = text.replace(parts.netloc + parts.path, REDACTED).replace(parts.path, REDACTED)
    return text


class _ScrubbedLogger(logging.LoggerAdapter):
    """slack-sdk's logger without our secrets: it logs request URLs at info, and a webhook's URL is its secret."""

    def __init__(self, logger: logging.Logger, secrets: list[str]) -> None:
        super().__init__(logger, {})
        self.secrets = secrets

    @property
    def level(self) -> int:  # slack-sdk reads it to decide whether to build its debug lines
        return self.logger.level

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            kwargs.pop("exc_info", None)  # a traceback's frames may quote a URL; the line says what failed
            self.logger.log(level, scrub(text, self.secrets), **kwargs)


# --- delivery ---------------------------------------------------------------------------------


class Delivery(BaseModel):
    """What became of one message: sent, failed (after its retries, within the deadline) or skipped (no Slack)."""

    model_config = ConfigDict(frozen=True)

    status: Literal["sent", "failed", "skipped"]
    channel: str | None = Field(None, description="The channel posted to; 'webhook' for a webhook.")
    attempts: int = Field(0, ge=0)
    seconds: float = Field(0.0, ge=0)
    error: str | None = Field(None, description="Why it failed, scrubbed of the token and the webhook URL.")


class _Post:
    """One message on its way: the clock, the attempts and the outcome, shared by the sending thread, its
    retry handlers and the caller waiting for it."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.started = time.monotonic()
        self.attempts = 1
        self.channel: str | None = None
        self.gave_up: str | None = None  # why a retry was not made
        self.abandoned = False
        self.outcome: Delivery | None = None
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finish(self, outcome: Delivery) -> None:
        with self.lock:
            if not self.abandoned:
                self.outcome = outcome

    def abandon(self) -> Delivery | None:
        """Stop waiting: no retry from now on; the outcome if it arrived meanwhile."""
        with self.lock:
            self.abandoned = True
            return self.outcome


class _WithinDeadline(RetryHandler):
    """Retries what the slack-sdk handler it is mixed into accepts, when the wait ends before the deadline."""

    post: _Post

    def can_retry(self, *, state, request, response=None, error=None) -> bool:
        if not super().can_retry(state=state, request=request, response=response, error=error):
            return False
        wait = self.wait_s(state, response)
        if self.post.abandoned:
            self.post.gave_up = "the caller stopped waiting"
            return False
        if wait is None or wait >= self.post.left():
            self.post.gave_up = self.why_not(wait)
            return False
        self._wait = wait
        return True

    def wait_s(self, state, response) -> float | None:
        return self.interval_calculator.calculate_sleep_duration(state.current_attempt)

    def why_not(self, wait: float | None) -> str:
        return f"a retry in {wait:.1f} s would pass the {self.post.deadline_s:g} s deadline"

    def prepare_for_next_attempt(self, *, state, request, response=None, error=None) -> None:
        # slack-sdk's own sleeps are replaced by the wait already checked against the deadline
        state.next_attempt_requested = True
        time.sleep(self._wait)
        state.increment_current_attempt()
        self.post.attempts += 1


class _ConnectionRetry(_WithinDeadline, ConnectionErrorRetryHandler):
    pass


class _ServerErrorRetry(_WithinDeadline, ServerErrorRetryHandler):
    pass


class _RateLimitRetry(_WithinDeadline, RateLimitErrorRetryHandler):
    def wait_s(self, state, response) -> float | None:
        """Slack's Retry-After, in seconds; None (no retry) when it is missing or not a number."""
        headers = response.headers if response is not None else {}
        for name, values in headers.items():
            if name.lower() == "retry-after":
                try:
                    return max(float(values[0] if isinstance(values, list) else values), 0.0)
                except ValueError:
                    return None
        return None

    def why_not(self, wait: float | None) -> str:
        if wait is None:
            return "Slack's 429 carried no usable Retry-After"
        return f"Retry-After {wait:g} s would pass the {self.post.deadline_s:g} s deadline"


def _retry_handlers(post: _Post) -> list[RetryHandler]:
    handlers: list[RetryHandler] = [
        _ConnectionRetry(max_retry_count=MAX_RETRIES, interval_calculator=BACKOFF),
        _RateLimitRetry(max_retry_count=MAX_RETRIES, interval_calculator=BACKOFF),
        _ServerErrorRetry(max_retry_count=MAX_RETRIES, interval_calculator=BACKOFF),
    ]
    for handler in handlers:
        handler.post = post
    return handlers


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
