"""Alertmanager's webhook payload (version 4, unchanged since Alertmanager 0.13), as pydantic models.

Alertmanager's notify/webhook package writes this JSON; the fields are those of its template.Data
and template.Alert. `extra="forbid"`: version 4 is a fixed shape, so a field we do not know means a
sender we do not understand, refused (400, which Alertmanager does not retry) rather than half read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class MalformedPayload(ValueError):
    """The body is not Alertmanager's version 4 webhook payload (answered 400), said in one sentence."""


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Alert(_Strict):
    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    starts_at: datetime = Field(alias="startsAt")
    # A firing alert's endsAt is when Alertmanager would resolve it unprompted (or year 1, "unset").
    ends_at: datetime = Field(alias="endsAt")
    generator_url: str = Field("", alias="generatorURL")
    # Alertmanager's hash of the label set, printed as 16 hex digits.
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$")

    @field_validator("labels")
    @classmethod
    def _named(cls, labels: dict[str, str]) -> dict[str, str]:
        if not labels.get("alertname"):
            raise ValueError("an alert has no alertname label")
        return labels

    @property
    def name(self) -> str:
        return self.labels["alertname"]


class WebhookPayload(_Strict):
    version: Literal["4"]
    group_key: str = Field(alias="groupKey")
    truncated_alerts: int = Field(0, ge=0, alias="truncatedAlerts")
    status: Literal["firing", "resolved"]
    receiver: str
    group_labels: dict[str, str] = Field(alias="groupLabels")
    common_labels: dict[str, str] = Field(alias="commonLabels")
    common_annotations: dict[str, str] = Field(alias="commonAnnotations")
    external_url: str = Field(alias="externalURL")
    alerts: list[Alert]


def parse_payload(value: object) -> WebhookPayload:
    """The payload, or MalformedPayload naming the first thing wrong with it."""
    try:
        return WebhookPayload.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        message = first["msg"].removeprefix("Value error, ")
        raise MalformedPayload(f"not an Alertmanager version 4 webhook payload: {where}: {message}") from None
