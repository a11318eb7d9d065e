"""Receive Alertmanager's webhook notifications and emit them as Oppen's Prefect events.

    python -m oppen.alerts.receiver serve [--host 127.0.0.1] [--port 8766]

`POST /alertmanager` answers 401 when a token is configured and the request does not carry it, 400
when the body is not Alertmanager's version 4 payload (Alertmanager does not retry a 4xx), 200 once
Prefect's server has every event, and 503 when Prefect cannot be reached (Alertmanager retries a 5xx,
with backoff, until its next flush). Each alert becomes one event with a deterministic id, and the
ones Prefect already has are not sent again: a retried delivery, or a firing alert Alertmanager
repeats (repeat_interval), reaches Prefect's automations once, however long after the first.

The token is Alertmanager's `http_config.authorization` bearer credential, read from
OPPEN_ALERT_RECEIVER_TOKEN; unset, the receiver accepts any caller (and says so when it starts).
It is never logged or printed.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from uuid import UUID

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from oppen.alerts.mapping import events_for
from oppen.alerts.payload import MalformedPayload, parse_payload
from oppen.mlflow_webhook_receiver import emit_to_prefect
from oppen.mlflow_webhooks import PrefectEventSpec
from oppen.settings import load_settings

WEBHOOK_PATH = "/alertmanager"
DEFAULT_PORT = 8766  # beside the MLflow webhook receiver's 8765
# A shorter bearer token is guessable.
MIN_TOKEN_LENGTH = 16
# A notification carries one alert (group_by: ['...']); thousands of alerts are a few MB at most.
MAX_BODY_BYTES = 4 << 20
# Alertmanager gives a notification until its next flush (group_interval, 1 minute here); answering
# 503 well inside that leaves it time to retry.
PREFECT_TIMEOUT_S = 10.0
# The events API answers at most 50 events per page.
LOOKUP_PAGE = 50

log = logging.getLogger("oppen.alerts.receiver")

Emitter = Callable[[list[PrefectEventSpec]], Awaitable[None]]
Lookup = Callable[[list[PrefectEventSpec]], Awaitable[set[UUID]]]


class ReceiverError(RuntimeError):
    """A setup mistake, told to the user in one sentence."""


def load_token() -> SecretStr | None:
    """OPPEN_ALERT_RECEIVER_TOKEN from the one settings object, read when `serve` starts."""
    token = load_settings().alert_receiver_token
    if token is not None and len(token.get_secret_value()) < MIN_TOKEN_LENGTH:
        raise ReceiverError(f"OPPEN_ALERT_RECEIVER_TOKEN must be at least {MIN_TOKEN_LENGTH} characters "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


async def known_to_prefect(specs: list[PrefectEventSpec]) -> set[UUID]:
    """The ids among `specs` that Prefect's server already stores.

    Prefect's triggers skip an event id they have seen for 30 minutes only; Alertmanager repeats a firing
    alert every repeat_interval (hours). Asking the store covers the rest (a just-sent event may not be
    stored yet, but then the triggers still remember it).
    """
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventIDFilter, EventOccurredFilter

    # The events API filters on `occurred` (default: the last day); alerts can be older than that.
    window = EventOccurredFilter(since=min(spec.occurred for spec in specs) - timedelta(minutes=1),
                                 until=datetime.now(timezone.utc) + timedelta(days=1))
    ids = [spec.id for spec in specs]
    found: set[UUID] = set()
    async with get_client() as client:
        for start in range(0, len(ids), LOOKUP_PAGE):
            page = await client.read_events(
                filter=EventFilter(id=EventIDFilter(id=ids[start:start + LOOKUP_PAGE]), occurred=window),
                limit=LOOKUP_PAGE)
            found |= {event.id for event in page.events}
    return found


def create_app(token: SecretStr | None, emit: Emitter = emit_to_prefect, known: Lookup = known_to_prefect) -> Starlette:
    """The receiver; `emit` and `known` are Prefect's server, replaceable in tests."""
    async def receive(request: Request) -> JSONResponse:
        if token is not None and not _authorized(request.headers.get("authorization"), token):
            return _refuse(401, "the request does not carry the receiver's bearer token")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _refuse(413, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            payload = parse_payload(_json(bytes(body)))
        except MalformedPayload as error:
            return _refuse(400, str(error))
        if payload.truncated_alerts:
            log.warning("Alertmanager left %d alert(s) of group %s out of this notification (max_alerts)",
                        payload.truncated_alerts, payload.group_key)
        specs = events_for(payload)
        if not specs:
            return JSONResponse({"events": []})
        try:
            sent_specs = await asyncio.wait_for(_deliver(specs, emit, known), PREFECT_TIMEOUT_S)
        except Exception as error:  # any failure to hand the events over: Alertmanager must retry
            reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
            return _refuse(503, f"Prefect could not be reached ({reason})")
        sent = {spec.id for spec in sent_specs}
        for spec in specs:
            log.info("%s %s (fingerprint %s, id %s)%s", spec.event, spec.payload["alertname"],
                     spec.payload["fingerprint"], spec.id, "" if spec.id in sent else ": Prefect has it already")
        return JSONResponse({"events": [{"event": spec.event, "id": str(spec.id),
                                         "alertname": spec.payload["alertname"], "sent": spec.id in sent}
                                        for spec in specs]})

    async def healthz(request: Request) -> JSONResponse:
        # Liveness only: whether Prefect is reachable is answered per notification (503), where it matters.
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route(WEBHOOK_PATH, receive, methods=["POST"]),
                             Route("/healthz", healthz, methods=["GET"])])


async def _deliver(specs: list[PrefectEventSpec], emit: Emitter, known: Lookup) -> list[PrefectEventSpec]:
    """Emit the events Prefect does not have yet, and return them."""
    try:
        have = await known(specs)
    except Exception as error:
        # Better a repeat Prefect's triggers may still recognise (30 minutes) than an alert held back: send them
        # all. A Prefect that cannot be reached fails the emit below, and Alertmanager retries.
        log.warning("could not ask Prefect which of these events it has (%s: %s); sending them all",
                    type(error).__name__, error)
        have = set()
    fresh = [spec for spec in specs if spec.id not in have]
    if fresh:
        await emit(fresh)
    return fresh


def _authorized(header: str | None, token: SecretStr) -> bool:
    scheme, _, credentials = (header or "").partition(" ")
    # Constant-time: a byte-by-byte comparison would tell a caller how much of a guess is right.
    return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(),
                                                              token.get_secret_value().encode())


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        raise MalformedPayload("the body is not JSON") from None


def _refuse(status: int, reason: str) -> JSONResponse:
    # The reason names fields and headers, never a header's value.
    log.warning("notification refused (%d): %s", status, reason)
    return JSONResponse({"error": reason}, status_code=status)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise ReceiverError("PREFECT_API_URL is unset; set it to the Prefect server the events go to")
    token = load_token()
    if token is None:
        log.warning("OPPEN_ALERT_RECEIVER_TOKEN is unset: any caller that reaches this port can raise alerts")
    log.info("receiving Alertmanager notifications at http://%s:%d%s; events go to %s", args.host, args.port,
             WEBHOOK_PATH, api_url)
    uvicorn.run(create_app(token), host=args.host, port=args.port, log_level="info")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oppen.alerts.receiver",
                                     description="Alertmanager notifications to Oppen's Prefect events.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="receive Alertmanager's webhook and emit Prefect events")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _serve(args)
    except ReceiverError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
