"""Which Slack credential a run uses, and keeping it out of every line we print or log.

A bot token or an incoming webhook's URL (a webhook's URL is its credential), from the environment or
else a Prefect Secret block. Neither is ever logged: errors are scrubbed of both, and slack-sdk, which
logs request URLs, logs through a scrubbing adapter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal
from urllib.parse import urlsplit

from prefect.blocks.system import Secret
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from oppen.settings import OppenSettings

# The logger these warnings had before they moved out of tasks/slack.py, so logging set up for it still applies.
log = logging.getLogger("tasks.slack")

REDACTED = "[redacted]"


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
