"""Oppen's Prefect automations, kept in automations.yaml and applied to a server by one idempotent command.

    python -m oppen.automations apply [--file automations.yaml] [--prune] [--set name=value ...] [--json]

Each automation is created, or updated by name; one whose rendering equals the server's copy is not
touched, because an update gives a trigger a new id, and a proactive trigger's open windows belong to
its id. `--prune` deletes the automations named "oppen: ..." that the file no longer lists, and nothing
else. Slack goes through the Webhook block `oppen-slack` (a bot token's chat.postMessage, or an incoming
webhook) and the variable `oppen_automations`, both kept in step by the same command.
Prints one line per change; exit status 2 for a bad file or setting (one sentence), 1 when applying fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import typing
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "automations.yaml"
PREFIX = "oppen: "  # every automation of the file, and the only ones --prune may delete
BLOCK_NAME = "oppen-slack"
VARIABLE_NAME = "oppen_automations"
SLACK_API_URL = "https://slack.com/api/"  # slack-sdk's default, as runs use it
# Prefect refuses a proactive trigger whose window is under 10 seconds.
MIN_WINDOW_MINUTES = 10 / 60
# Cloud-only on Prefect 3.8: a self-hosted server accepts them and never fires them.
CLOUD_ONLY = {"metric", "declare-incident"}

_REFERENCE = re.compile(r"\$([a-z_][a-z0-9_]*)")


class AutomationsFileError(ValueError):
    """A bad automations file or setting, said in one sentence."""


class ApplyFailed(RuntimeError):
    """Applying stopped part way (the server unreachable, a refusal); what is applied stays applied."""


class Change(NamedTuple):
    name: str
    action: Literal["created", "updated", "unchanged", "deleted", "skipped"]
    detail: str = ""

    def line(self) -> str:
        return f"{self.action:<9} {self.name}" + (f"  ({self.detail})" if self.detail else "")


# --- the file ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Settings(_Strict):
    """The file's tunables; `$name` in a description, trigger or Prefect action is replaced by its value."""

    late_after_minutes: float = Field(10, le=7 * 24 * 60,
                                      description="How long a Late run may wait for a worker before it is cancelled.")
    pending_for_minutes: float = Field(10, le=7 * 24 * 60,
                                       description="How long a pod may stay unschedulable before its run is cancelled.")
    pause_deployment_on_refusal: bool = Field(False, description="A refused or stopped run also pauses its deployment.")
    mlflow_ui_url: str | None = Field(None, pattern=r"^https?://\S+$",
                                      description="MLflow UI for links; None: OppenSettings.ui_url.")

    @field_validator("late_after_minutes", "pending_for_minutes")
    @classmethod
    def _a_proactive_window(cls, minutes: float) -> float:
        if not minutes >= MIN_WINDOW_MINUTES:
            raise ValueError("must be at least 10 seconds (0.17 minutes), Prefect's shortest proactive window")
        return minutes


class SlackAction(_Strict):
    slack: str = Field(description="A payload of the file, posted to Slack through the oppen-slack Webhook block.")


class PrefectAction(_Strict):
    prefect: dict[str, Any] = Field(description="A Prefect action, in Prefect's own schema.")
    when: str | None = Field(None, pattern=r"^\$[a-z_][a-z0-9_]*$", description="A boolean setting, as `$name`.")


class AutomationSpec(_Strict):
    name: str = Field(pattern=rf"^{PREFIX}\S.*$", max_length=200)
    description: str = ""
    enabled: bool = True
    trigger: dict[str, Any]
    actions: list[SlackAction | PrefectAction] = Field(min_length=1)


class AutomationsFile(_Strict):
    settings: Settings = Settings()
    automations: list[AutomationSpec] = Field(min_length=1)
    prelude: str = Field("", description="Jinja put before every payload (shared macros).")
    payloads: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> AutomationsFile:
        names = [spec.name for spec in self.automations]
        if repeated := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"automation names repeat: {', '.join(repeated)}")
        used = {action.slack for spec in self.automations for action in spec.actions if isinstance(action, SlackAction)}
        if missing := sorted(used - set(self.payloads)):
            raise ValueError(f"slack payload {missing[0]!r} is not among the payloads")
        if unused := sorted(set(self.payloads) - used):
            raise ValueError(f"payload {unused[0]!r} is used by no automation")
        for spec in self.automations:
            for action in spec.actions:
                if isinstance(action, PrefectAction) and action.when:
                    if not isinstance(_setting(self.settings, action.when[1:], spec.name), bool):
                        raise ValueError(f"{spec.name!r}: `when: {action.when}` must name a true/false setting")
        return self

    def payload_template(self, name: str) -> str:
        """What Prefect renders for a Slack action: the shared prelude, then the payload."""
        return self.prelude + self.payloads[name]


def load_automations_file(path: Path = DEFAULT_FILE, overrides: dict[str, Any] | None = None) -> AutomationsFile:
    """The file, validated, with `overrides` replacing its settings; a bad one raises AutomationsFileError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise AutomationsFileError(f"{path} does not exist") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise AutomationsFileError(f"{path} is not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if not isinstance(raw, dict):
        raise AutomationsFileError(f"{path} must be a mapping with `settings`, `automations` and `payloads`")
    if overrides:
        unknown = sorted(set(overrides) - set(Settings.model_fields))
        if unknown:
            raise AutomationsFileError(f"unknown setting {unknown[0]!r}; the settings are "
                                       f"{', '.join(Settings.model_fields)}")
        raw = {**raw, "settings": {**(raw.get("settings") or {}), **overrides}}
    try:
        spec = AutomationsFile.model_validate(raw)
    except ValidationError as error:
        raise AutomationsFileError(f"{path}: {_first_error(error)}") from None
    try:  # render once without Slack targets, so a bad trigger, action or template fails here, not on the server
        render_automations(spec, block_id=UUID(int=0), check_templates=True)
    except AutomationsFileError as error:
        raise AutomationsFileError(f"{path}: {error}") from None
    return spec


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{more}" if where else f"{message}{more}"


# --- rendering --------------------------------------------------------------------------------


class Planned(NamedTuple):
    name: str
    automation: Any  # prefect.automations.Automation, or None when skipped
    skipped_because: str = ""


def render_automations(spec: AutomationsFile, block_id: UUID | None,
                       check_templates: bool = False) -> list[Planned]:
    """Prefect Automation objects for the file; `block_id` None (no Slack) leaves Slack actions out."""
    from prefect.automations import Automation, CallWebhook

    planned: list[Planned] = []
    for automation in spec.automations:
        def resolve(value: Any, name: str = automation.name) -> Any:
            return _resolve(value, spec.settings, name)

        actions: list[Any] = []
        dropped_slack = False
        for action in automation.actions:
            if isinstance(action, SlackAction):
                template = spec.payload_template(action.slack)
                if check_templates:
                    _check_template(template, automation.name, action.slack)
                if block_id is None:
                    dropped_slack = True
                else:
                    actions.append(CallWebhook(block_document_id=block_id, payload=template))
            elif action.when is None or resolve(action.when):
                actions.append(_prefect_action(resolve(action.prefect), automation.name))
        if not actions:
            why = ("Slack is not configured (OPPEN_SLACK_BOT_TOKEN, OPPEN_SLACK_WEBHOOK_URL or their Secret blocks)"
                   if dropped_slack else "every action is switched off by its `when`")
            planned.append(Planned(automation.name, None, why))
            continue
        trigger = _trigger(resolve(automation.trigger), automation.name)
        try:
            rendered = Automation(name=automation.name, description=resolve(automation.description),
                                  enabled=automation.enabled, trigger=trigger, actions=actions)
        except ValidationError as error:
            raise AutomationsFileError(f"{automation.name!r}: {_first_error(error)}") from None
        planned.append(Planned(automation.name, rendered))
    return planned


def _setting(settings: Settings, name: str, automation: str) -> Any:
    if name not in Settings.model_fields:
        raise ValueError(f"{automation!r} refers to ${name}, which is not a setting ({', '.join(Settings.model_fields)})")
    return getattr(settings, name)


def _resolve(value: Any, settings: Settings, automation: str) -> Any:
    """`$name` as a whole value is the setting itself; inside a text, its text (10, 0.25, true)."""
    try:
        if isinstance(value, str):
            if whole := _REFERENCE.fullmatch(value):
                return _setting(settings, whole[1], automation)
            return _REFERENCE.sub(lambda m: _text(_setting(settings, m[1], automation)), value)
        if isinstance(value, dict):
            return {key: _resolve(item, settings, automation) for key, item in value.items()}
        if isinstance(value, list):
            return [_resolve(item, settings, automation) for item in value]
    except ValueError as error:
        raise AutomationsFileError(str(error)) from None
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _trigger(trigger: dict[str, Any], automation: str) -> dict[str, Any]:
    """Prefect's trigger schema, checked for keys Prefect would silently ignore; `within: {minutes: n}` made seconds."""
    from prefect.events.schemas.automations import (
        CompoundTrigger,
        EventTrigger,
        SequenceTrigger,
        trigger_discriminator,
    )

    kind = trigger_discriminator(trigger)
    if kind in CLOUD_ONLY:
        raise AutomationsFileError(f"{automation!r}: {kind} triggers work only on Prefect Cloud")
    model = {"event": EventTrigger, "compound": CompoundTrigger, "sequence": SequenceTrigger}.get(kind)
    if model is None:
        raise AutomationsFileError(f"{automation!r}: unknown trigger type {kind!r}")
    if unknown := sorted(set(trigger) - set(model.model_fields)):
        raise AutomationsFileError(f"{automation!r}: the trigger has no field {unknown[0]!r} "
                                   f"(Prefect would ignore it)")
    trigger = dict(trigger)
    within = trigger.get("within")
    if isinstance(within, dict):
        if set(within) != {"minutes"} or not isinstance(within["minutes"], (int, float)):
            raise AutomationsFileError(f"{automation!r}: `within` is seconds, or `{{minutes: n}}`")
        trigger["within"] = timedelta(minutes=within["minutes"]).total_seconds()
    if "triggers" in trigger:
        trigger["triggers"] = [_trigger(child, automation) for child in trigger["triggers"]]
    return trigger


def _prefect_action(action: dict[str, Any], automation: str) -> Any:
    from prefect.events.actions import ActionTypes

    kinds = {model.model_fields["type"].default: model for model in typing.get_args(ActionTypes)}
    kind = action.get("type")
    if kind in CLOUD_ONLY:
        raise AutomationsFileError(f"{automation!r}: {kind} works only on Prefect Cloud")
    if kind not in kinds:
        raise AutomationsFileError(f"{automation!r}: unknown action type {kind!r}")
    model = kinds[kind]
    if unknown := sorted(set(action) - set(model.model_fields)):
        raise AutomationsFileError(f"{automation!r}: a {kind} action has no field {unknown[0]!r}")
    try:
        return model.model_validate(action)
    except ValidationError as error:
        raise AutomationsFileError(f"{automation!r}: {kind}: {_first_error(error)}") from None


def _check_template(template: str, automation: str, payload: str) -> None:
    """Prefect's own check (syntax, loop limits), so a bad template fails at load, not as a 422 mid-apply."""
    import jinja2
    from prefect.server.utilities.user_templates import TemplateSecurityError, validate_user_template

    try:
        validate_user_template(template)
    except (jinja2.TemplateSyntaxError, TemplateSecurityError) as error:
        line = f" line {error.lineno}" if getattr(error, "lineno", None) else ""
        raise AutomationsFileError(f"{automation!r}: payload {payload!r}{line}: {error.message}") from None


# --- Slack ------------------------------------------------------------------------------------


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


# --- applying ---------------------------------------------------------------------------------


def apply_automations(path: Path = DEFAULT_FILE, prune: bool = False,
                      overrides: dict[str, Any] | None = None) -> list[Change]:
    """Create, update (or with `prune`, delete) the file's automations on the configured Prefect server."""
    from oppen.settings import load_settings

    spec = load_automations_file(path, overrides)
    settings = load_settings()
    # Before the event loop: Prefect's sync calls (the Secret blocks) turn into coroutines inside one.
    try:
        slack = slack_target(settings)
    except Exception as error:  # the budgets file (team channels) unreadable
        raise ApplyFailed(f"reading the Slack settings: {_scrubbed(error, ())}") from None
    try:
        return asyncio.run(_apply(spec, slack, template_variables(spec, slack, settings.ui_url), prune))
    except Exception as error:
        raise ApplyFailed(_scrubbed(error, slack.secrets if slack else ())) from None


def _scrubbed(error: Exception, secrets: tuple[str, ...]) -> str:
    """The error's first line, without the Slack credential: an API refusal may quote a request body."""
    from tasks.slack import scrub

    text = (str(error).splitlines() or [""])[0]
    return scrub(f"{type(error).__name__}: {text}"[:400], secrets)


async def _apply(spec: AutomationsFile, slack: SlackTarget | None, variables: dict[str, Any],
                 prune: bool) -> list[Change]:
    from prefect.client.orchestration import get_client

    changes: list[Change] = []
    async with get_client() as client:
        block_id = None
        if slack is not None:
            block_id, change = await _ensure_block(slack)
            changes += [change, await _ensure_variable(client, variables)]
        existing: dict[str, list[Any]] = {}
        for automation in await _read_automations(client):
            existing.setdefault(automation.name, []).append(automation)
        for plan in render_automations(spec, block_id):
            found = existing.pop(plan.name, [])
            if plan.automation is None:  # left as it is: no copy of it is right or wrong without Slack
                changes.append(Change(plan.name, "skipped", plan.skipped_because))
                continue
            changes += await _upsert(client, plan.automation, found)
        if prune:
            for name, stale in sorted(existing.items()):
                if name.startswith(PREFIX):
                    for automation in stale:
                        await client.delete_automation(automation.id)
                        changes.append(Change(name, "deleted", "not in the file"))
    return changes


async def _read_automations(client) -> list[Any]:
    page, found = 200, []
    while True:
        batch = await client.read_automations(limit=page, offset=len(found))
        found += batch
        if len(batch) < page:
            return found


async def _upsert(client, desired, found: list[Any]) -> list[Change]:
    from prefect.events.schemas.automations import AutomationCore

    # Two of one name would both fire: keep the one already right (else the first), delete the rest.
    found = sorted(found, key=lambda existing: _comparable(existing) != _comparable(desired))
    keep, duplicates = (found[0], found[1:]) if found else (None, [])
    changes = []
    for duplicate in duplicates:
        await client.delete_automation(duplicate.id)
        changes.append(Change(desired.name, "deleted", "a second automation of the same name"))
    core = AutomationCore(**desired.model_dump(exclude={"id", "owner_resource"}))  # the API refuses owner_resource
    if keep is None:
        await client.create_automation(core)
        return changes + [Change(desired.name, "created")]
    differs = sorted(key for key, value in _comparable(desired).items() if _comparable(keep).get(key) != value)
    if not differs:
        return changes + [Change(desired.name, "unchanged")]
    await client.update_automation(keep.id, core)
    return changes + [Change(desired.name, "updated", ", ".join(differs))]


def _comparable(automation) -> dict[str, Any]:
    """What the file decides, as Python values (sets compare regardless of order); ids and ownership left out."""
    return automation.model_dump(exclude={"id", "owner_resource"})


async def _ensure_block(slack: SlackTarget) -> tuple[UUID, Change]:
    from prefect.blocks.webhook import Webhook

    name = f"block {BLOCK_NAME}"
    try:
        current = await Webhook.aload(BLOCK_NAME)
    except ValueError:  # "Unable to find block document named ..."
        current = None
    if current is not None and (current.method, current.url.get_secret_value(), current.headers.get_secret_value()) \
            == ("POST", slack.url, slack.headers):
        return current._block_document_id, Change(name, "unchanged", slack.describe())
    block = Webhook(method="POST", url=slack.url, headers=slack.headers)
    block_id = await block.asave(BLOCK_NAME, overwrite=True)  # an update keeps the id the automations name
    return block_id, Change(name, "created" if current is None else "updated", slack.describe())


async def _ensure_variable(client, value: dict[str, Any]) -> Change:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    name = f"variable {VARIABLE_NAME}"
    current = await client.read_variable_by_name(VARIABLE_NAME)
    if current is None:
        await client.create_variable(VariableCreate(name=VARIABLE_NAME, value=value))
        return Change(name, "created")
    if current.value == value:
        return Change(name, "unchanged")
    await client.update_variable(VariableUpdate(name=VARIABLE_NAME, value=value))
    return Change(name, "updated")


# --- command ----------------------------------------------------------------------------------


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AutomationsFileError(f"--set takes name=value, not {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oppen.automations", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    apply = commands.add_parser("apply", help="create or update the file's automations (idempotent)")
    apply.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the automations file (default: %(default)s)")
    apply.add_argument("--prune", action="store_true", help='delete "oppen: ..." automations the file no longer lists')
    apply.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                       help="override a setting of the file (e.g. late_after_minutes=15)")
    apply.add_argument("--json", action="store_true", help="print the changes as JSON")
    args = parser.parse_args(argv)
    try:
        changes = apply_automations(args.file, prune=args.prune, overrides=_parse_sets(args.sets))
    except AutomationsFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ApplyFailed as error:
        print(f"error: applying the automations failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([change._asdict() for change in changes], indent=2))
    else:
        print("\n".join(change.line() for change in changes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
