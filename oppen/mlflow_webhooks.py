"""MLflow registry webhooks, the pure parts: check a delivery's signature, turn its payload into Oppen events.

MLflow (3.3+, SQL backends) signs each delivery (mlflow/webhooks/delivery.py) with
`X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")>` and sends
`X-MLflow-Timestamp` (Unix seconds) and `X-MLflow-Delivery-Id`. The receiver
(oppen/mlflow_webhook_receiver.py) does the I/O around these functions.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any
from urllib.parse import quote
from uuid import UUID

from pydantic import BaseModel, ConfigDict, ValidationError

from oppen.events import MODEL_PROMOTED, MODEL_REGISTERED, model_event_id, model_resource

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
# The Standard Webhooks tolerance MLflow follows: wide enough for MLflow's own retries
# (1 + 2 + 4 s of backoff) and modest clock skew, narrow enough that a captured delivery
# cannot be replayed later. A replay inside the window is harmless: it maps to the same
# deterministic event id, which Prefect keeps once.
MAX_AGE_SECONDS = 300
SOURCE = "mlflow-webhook"
# The two deliveries the receiver turns into events; `register` subscribes to exactly these.
SUBSCRIBED_EVENTS = ("model_version.created", "model_version_alias.created")


class SignatureError(ValueError):
    """The delivery is not signed with our secret (answered 401)."""


class StaleDelivery(ValueError):
    """The delivery is signed but its timestamp is outside the freshness window (answered 400)."""


class MalformedPayload(ValueError):
    """The body is not the JSON shape MLflow sends (answered 400)."""


def verify_signature(
    secret: str, delivery_id: str | None, timestamp: str | None, body: bytes, header: str | None,
    now: Callable[[], float] = time.time,
) -> None:
    """Accept the delivery or raise SignatureError / StaleDelivery with one sentence (never naming the secret)."""
    if not header or not timestamp or not delivery_id:
        missing = [name for name, value in ((SIGNATURE_HEADER, header), (TIMESTAMP_HEADER, timestamp),
                                            (DELIVERY_ID_HEADER, delivery_id)) if not value]
        raise SignatureError(f"the delivery lacks {', '.join(missing)}")
    version, _, signature = header.partition(",")
    if version != SIGNATURE_VERSION or not signature:
        raise SignatureError(f"{SIGNATURE_HEADER} is not of the form '{SIGNATURE_VERSION},<base64 HMAC>'")
    # Sign the bytes as received: MLflow signs the UTF-8 text it then sends, so this is the same
    # content, and a body that is not UTF-8 simply fails to match instead of failing to decode.
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()
    # Constant-time: a byte-by-byte comparison would tell an attacker how much of a guess is right.
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise SignatureError("the delivery's signature does not match the shared secret")
    try:
        sent_at = int(timestamp)
    except ValueError:
        raise StaleDelivery(f"{TIMESTAMP_HEADER} {timestamp!r} is not a Unix time in seconds") from None
    skew = abs(now() - sent_at)
    if skew > MAX_AGE_SECONDS:
        raise StaleDelivery(f"the delivery's timestamp is {skew:.0f} s off this receiver's clock, "
                            f"outside the {MAX_AGE_SECONDS} s window")


class PrefectEventSpec(BaseModel):
    """One Prefect event to emit: the fields of `prefect.events.Event`, built without importing Prefect."""

    model_config = ConfigDict(frozen=True)

    event: str
    resource: dict[str, str]
    related: list[dict[str, str]] = []
    payload: dict[str, Any]
    id: UUID
    occurred: datetime


class _Envelope(BaseModel):
    # extra="ignore": MLflow adds fields over time (`workspace` when workspaces are on).
    model_config = ConfigDict(extra="ignore")

    entity: str
    action: str
    timestamp: datetime
    data: dict[str, Any]


# Versions as integers, as the registry numbers them and as Oppen's flows put them in payloads: whichever
# source's copy of an event Prefect keeps, a consumer sees the same types.
class _VersionCreated(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    version: int
    run_id: str | None = None


class _AliasCreated(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    version: int
    alias: str


def version_url(mlflow_ui_url: str | None, name: str, version: int) -> str | None:
    if not mlflow_ui_url:
        return None
    return f"{mlflow_ui_url.rstrip('/')}/#/models/{quote(name, safe='')}/versions/{version}"


def _parse(model: type[BaseModel], value: Any, what: str) -> Any:
    try:
        return model.model_validate(value)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise MalformedPayload(f"{what}: {where}: {first['msg'].lower()}") from None


def events_for(payload: Any, mlflow_ui_url: str | None = None) -> list[PrefectEventSpec]:
    """The Oppen events one MLflow delivery stands for; other registry events map to none."""
    envelope = _parse(_Envelope, payload, "not an MLflow webhook payload")
    kind = f"{envelope.entity}.{envelope.action}"
    if kind == "model_version.created":
        created = _parse(_VersionCreated, envelope.data, "model_version.created data")
        related = ([{"prefect.resource.id": f"mlflow.run.{created.run_id}", "prefect.resource.role": "mlflow-run"}]
                   if created.run_id else [])
        return [PrefectEventSpec(
            event=MODEL_REGISTERED, resource=model_resource(created.name, created.version), related=related,
            payload={"name": created.name, "version": created.version, "alias": None, "run_id": created.run_id,
                     "source": SOURCE, "links": _links(mlflow_ui_url, created.name, created.version)},
            id=model_event_id(MODEL_REGISTERED, created.name, created.version, None), occurred=envelope.timestamp,
        )]
    if kind == "model_version_alias.created":
        moved = _parse(_AliasCreated, envelope.data, "model_version_alias.created data")
        return [PrefectEventSpec(
            event=MODEL_PROMOTED, resource=model_resource(moved.name, moved.version, moved.alias),
            payload={"name": moved.name, "version": moved.version, "alias": moved.alias, "replaced_version": None,
                     "source": SOURCE, "links": _links(mlflow_ui_url, moved.name, moved.version)},
            id=model_event_id(MODEL_PROMOTED, moved.name, moved.version, moved.alias), occurred=envelope.timestamp,
        )]
    return []


def _links(mlflow_ui_url: str | None, name: str, version: int) -> dict[str, str]:
    url = version_url(mlflow_ui_url, name, version)
    return {"mlflow": url} if url else {}
