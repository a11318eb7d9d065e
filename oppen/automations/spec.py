"""automations.yaml as pydantic models: loading, validation errors in one sentence, and `$setting` substitution.

Loading also renders the file once (render.py) without Slack targets, so a bad trigger, action or template is
reported when the file is read rather than by the server half-way through an apply.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "automations.yaml"  # the repository root's
PREFIX = "oppen: "  # every automation of the file, and the only ones --prune may delete
# Prefect refuses a proactive trigger whose window is under 10 seconds.
MIN_WINDOW_MINUTES = 10 / 60

_REFERENCE = re.compile(r"\$([a-z_][a-z0-9_]*)")


class AutomationsFileError(ValueError):
    """A bad automations file or setting, said in one sentence."""


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
    # Imported here, not above: render.py imports this module for the models.
    from oppen.automations.render import render_automations

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


# --- `$setting` substitution ------------------------------------------------------------------


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
