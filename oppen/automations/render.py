"""The file's automations as `prefect.automations.Automation` objects, checked the way Prefect would check them.

Triggers and actions are validated against Prefect's own schemas, with the keys Prefect would silently ignore
and the Cloud-only kinds refused, so a mistake in automations.yaml is one sentence here, not a 422 mid-apply.
"""

from __future__ import annotations

import typing
from datetime import timedelta
from typing import Any, NamedTuple
from uuid import UUID

from pydantic import ValidationError

from oppen.automations.spec import AutomationsFile, AutomationsFileError, SlackAction, _first_error, _resolve

# Cloud-only on Prefect 3.8: a self-hosted server accepts them and never fires them.
CLOUD_ONLY = {"metric", "declare-incident"}


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
