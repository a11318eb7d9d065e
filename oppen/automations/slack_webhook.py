"""Where the automations' Slack actions post: the `oppen-slack` Webhook block's contents (secret) and the
`oppen_automations` variable that payload templates read (not secret), both found as runs find Slack."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from oppen.automations.spec import AutomationsFile

SLACK_API_URL = "https://slack.com/api/"  # slack-sdk's default, as runs use it


@dataclass(frozen=True)
class SlackTarget:
    """Where Slack actions post: the Webhook block's fields (secret) and what templates may know (not secret)."""

    mode: Literal["bot", "webhook"]
    url: str = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    channel: str | None = None
    team_channels: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = field(default=(), repr=False)  # scrubbed from any error the command prints

    def describe(self) -> str:  # never the URL: a webhook's URL is its credential
        return "bot token, chat.postMessage" if self.mode == "bot" else "incoming webhook"


def slack_target(settings) -> SlackTarget | None:
    """Slack as runs find it (tasks/slack.py: the environment, then the Secret blocks); None when unset."""
    from oppen.cost.budgets import load_budgets
    from tasks.slack import resolve_credentials

    credentials = resolve_credentials(settings)
    json_type = {"Content-Type": "application/json; charset=utf-8"}  # Prefect's Webhook sends the text as is
    if credentials.bot_token:
        url = (settings.slack_api_url or SLACK_API_URL).rstrip("/") + "/chat.postMessage"
        teams = load_budgets(settings.budgets_file).teams
        channels = {team: channel for team, spec in teams.items() if (channel := getattr(spec, "slack_channel", None))}
        token = credentials.bot_token.get_secret_value()
        return SlackTarget("bot", url, {**json_type, "Authorization": f"Bearer {token}"}, settings.slack_channel,
                           channels, (token,))
    if credentials.webhook_url:
        url = credentials.webhook_url.get_secret_value()
        return SlackTarget("webhook", url, json_type, secrets=(url,))
    return None


def template_variables(spec: AutomationsFile, slack: SlackTarget | None, mlflow_ui_url: str | None) -> dict[str, Any]:
    """The variable payloads read (`variables.oppen_automations`): nothing secret."""
    return {"mlflow_ui_url": spec.settings.mlflow_ui_url or mlflow_ui_url,
            "mode": slack.mode if slack else None,
            "channel": slack.channel if slack else None,
            "team_channels": dict(slack.team_channels) if slack else {}}
