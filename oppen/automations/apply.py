"""Applying the file to a Prefect server: create, update by name, leave alone what already matches, prune.

An automation whose rendering equals the server's copy is not touched, because an update gives a trigger
a new id, and a proactive trigger's open windows belong to its id. Pruning deletes only the automations
named "oppen: ..." that the file no longer lists. The Slack Webhook block and the template variable are
kept in step in the same pass.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal, NamedTuple
from uuid import UUID

from oppen.automations.render import render_automations
from oppen.automations.slack_webhook import SlackTarget, slack_target, template_variables
from oppen.automations.spec import DEFAULT_FILE, PREFIX, AutomationsFile, load_automations_file

BLOCK_NAME = "oppen-slack"
VARIABLE_NAME = "oppen_automations"


class ApplyFailed(RuntimeError):
    """Applying stopped part way (the server unreachable, a refusal); what is applied stays applied."""


class Change(NamedTuple):
    name: str
    action: Literal["created", "updated", "unchanged", "deleted", "skipped"]
    detail: str = ""

    def line(self) -> str:
        return f"{self.action:<9} {self.name}" + (f"  ({self.detail})" if self.detail else "")


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
