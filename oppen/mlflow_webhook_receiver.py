"""Receive MLflow registry webhooks and emit them as Oppen's Prefect events.

    python -m oppen.mlflow_webhook_receiver serve [--host 127.0.0.1] [--port 8765]
    python -m oppen.mlflow_webhook_receiver register --url URL [--name oppen-registry]

`serve` answers `POST /mlflow-webhook`: 401 when the signature is missing or wrong, 400 when the
delivery is stale or not MLflow's payload, 200 once Prefect's server has the events, 503 when
Prefect cannot be reached (MLflow retries 503s, and records the delivery as failed after that).
`register` creates or updates the MLflow webhook that points at it. Both read the HMAC secret from
OPPEN_MLFLOW_WEBHOOK_SECRET or the Prefect Secret block `oppen-mlflow-webhook-secret`; neither
ever logs or prints it. What MLflow's server needs is in the README (MLflow registry webhooks).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from oppen.mlflow_webhooks import (
    DELIVERY_ID_HEADER,
    SIGNATURE_HEADER,
    SUBSCRIBED_EVENTS,
    TIMESTAMP_HEADER,
    MalformedPayload,
    PrefectEventSpec,
    SignatureError,
    StaleDelivery,
    events_for,
    verify_signature,
)
from oppen.settings import OppenSettings, load_settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.webhook import Webhook

SECRET_BLOCK = "oppen-mlflow-webhook-secret"
WEBHOOK_PATH = "/mlflow-webhook"
# An HMAC key shorter than this is guessable, and `register` publishes a fingerprint of it.
MIN_SECRET_LENGTH = 16
# MLflow's registry payloads are a few hundred bytes (tags included); anything near this is not one.
MAX_BODY_BYTES = 1 << 20
# Under MLflow's own 30 s request timeout, so a stuck Prefect gives MLflow a 503 it retries, not a timeout.
EMIT_TIMEOUT_S = 10.0

log = logging.getLogger("oppen.mlflow_webhook_receiver")

Emitter = Callable[[list[PrefectEventSpec]], Awaitable[None]]


class ReceiverError(RuntimeError):
    """A setup mistake, told to the user in one sentence."""


def load_secret(settings: OppenSettings) -> SecretStr:
    """The shared HMAC secret: the setting, else the Prefect Secret block; refuse a missing or short one."""
    secret = settings.mlflow_webhook_secret or _secret_from_block()
    if len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
        raise ReceiverError(f"the MLflow webhook secret must be at least {MIN_SECRET_LENGTH} characters "
                            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return secret


def _secret_from_block() -> SecretStr:
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL

    unset = "no MLflow webhook secret: OPPEN_MLFLOW_WEBHOOK_SECRET is unset and"
    if not PREFECT_API_URL.value():
        # Without an API URL Prefect would start a temporary server, which holds no blocks.
        raise ReceiverError(f"{unset} PREFECT_API_URL is unset, so the Secret block {SECRET_BLOCK!r} cannot be read")
    try:
        block = Secret.load(SECRET_BLOCK)
    except ValueError:
        raise ReceiverError(f"{unset} Prefect has no Secret block named {SECRET_BLOCK!r}") from None
    except Exception as error:
        raise ReceiverError(f"{unset} the Secret block {SECRET_BLOCK!r} could not be read "
                            f"({type(error).__name__}: {error})") from None
    # The raw value: Secret.get() would JSON-decode a secret that happens to look like a number.
    return SecretStr(block.value.get_secret_value())


async def emit_to_prefect(specs: list[PrefectEventSpec]) -> None:
    """Send the events and return only once Prefect's server has read them."""
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    # checkpoint_every=1: after each event the client pings and waits for the pong, so when emit
    # returns the server has received the event (by default the client confirms every 700 events).
    # Two reconnection attempts: a Prefect that is down should give MLflow a prompt 503.
    async with get_events_client(reconnection_attempts=2, checkpoint_every=1) as client:
        for spec in specs:
            await client.emit(Event(**spec.model_dump()))


def create_app(secret: SecretStr, mlflow_ui_url: str | None, emit: Emitter = emit_to_prefect,
               now: Callable[[], float] = time.time) -> Starlette:
    """The receiver; `emit` and `now` are Prefect and the clock, replaceable in tests."""
    async def receive(request: Request) -> JSONResponse:
        delivery = request.headers.get(DELIVERY_ID_HEADER)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _refuse(413, delivery, f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            verify_signature(secret.get_secret_value(), delivery, request.headers.get(TIMESTAMP_HEADER), bytes(body),
                             request.headers.get(SIGNATURE_HEADER), now)
        except SignatureError as error:
            return _refuse(401, delivery, str(error))
        except StaleDelivery as error:
            return _refuse(400, delivery, str(error))
        try:
            specs = events_for(_json(body), mlflow_ui_url)
        except MalformedPayload as error:
            return _refuse(400, delivery, str(error))
        if not specs:
            log.debug("delivery %r: not a registry event Oppen maps; acknowledged", delivery)
            return JSONResponse({"events": []})
        try:
            await asyncio.wait_for(emit(specs), EMIT_TIMEOUT_S)
        except Exception as error:  # any failure to hand over the event: MLflow must see the delivery fail
            reason = "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
            return _refuse(503, delivery, f"Prefect could not be reached ({reason})")
        for spec in specs:
            alias = spec.resource.get("oppen.model.alias")
            log.info("delivery %r: emitted %s for %s version %s%s (id %s)", delivery, spec.event,
                     spec.resource["oppen.model.name"], spec.resource["oppen.model.version"],
                     f", alias {alias}" if alias else "", spec.id)
        return JSONResponse({"events": [{"event": spec.event, "id": str(spec.id)} for spec in specs]})

    async def healthz(request: Request) -> JSONResponse:
        # Liveness only: whether Prefect is reachable is answered per delivery (503), where it matters.
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route(WEBHOOK_PATH, receive, methods=["POST"]),
                             Route("/healthz", healthz, methods=["GET"])])


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        raise MalformedPayload("the body is not JSON") from None


def _refuse(status: int, delivery: str | None, reason: str) -> JSONResponse:
    # The reason names headers and fields, never the secret or the signature's value.
    log.warning("delivery %r refused (%d): %s", delivery, status, reason)
    return JSONResponse({"error": reason}, status_code=status)


def secret_fingerprint(secret: SecretStr) -> str:
    """A short, slow-to-invert digest of the secret: MLflow never returns a webhook's secret, so this,
    kept in the webhook's description, is how `register` tells whether the secret changed."""
    digest = hashlib.pbkdf2_hmac("sha256", secret.get_secret_value().encode(), b"oppen-mlflow-webhook", 200_000)
    return digest[:8].hex()


def register_webhook(client: MlflowClient, url: str, name: str, secret: SecretStr) -> str:
    """Create or update the webhook named `name`; returns "created", "updated" or "unchanged"."""
    from mlflow.exceptions import MlflowException

    description = f"Oppen: model registry events to Prefect (secret fingerprint {secret_fingerprint(secret)})"
    try:
        same_name = [hook for hook in _all_webhooks(client) if hook.name == name]
        if len(same_name) > 1:
            raise ReceiverError(f"{len(same_name)} MLflow webhooks are named {name!r}; delete all but one")
        if not same_name:
            client.create_webhook(name=name, url=url, events=list(SUBSCRIBED_EVENTS), description=description,
                                  secret=secret.get_secret_value(), status="ACTIVE")
            return "created"
        hook = same_name[0]
        if (hook.url == url and sorted(str(event) for event in hook.events) == sorted(SUBSCRIBED_EVENTS)
                and hook.status.is_active() and hook.description == description):
            return "unchanged"
        client.update_webhook(hook.webhook_id, url=url, events=list(SUBSCRIBED_EVENTS), description=description,
                              secret=secret.get_secret_value(), status="ACTIVE")
        return "updated"
    except MlflowException as error:
        raise ReceiverError(f"MLflow refused the webhook: {error.message}") from None


def _all_webhooks(client: MlflowClient) -> list[Webhook]:
    hooks, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        hooks.extend(page)
        if not page.token:
            return hooks
        token = page.token


def _serve(args: argparse.Namespace, settings: OppenSettings) -> None:
    import uvicorn
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise ReceiverError("PREFECT_API_URL is unset; set it to the Prefect server the events go to")
    secret = load_secret(settings)
    log.info("receiving MLflow webhooks at http://%s:%d%s; events go to %s", args.host, args.port, WEBHOOK_PATH,
             api_url)
    uvicorn.run(create_app(secret, settings.ui_url), host=args.host, port=args.port, log_level="info")


def _register(args: argparse.Namespace, settings: OppenSettings) -> None:
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    if not uri.startswith(("http://", "https://")):
        raise ReceiverError(f"webhooks are stored and delivered by an MLflow server; point "
                            f"OPPEN_MLFLOW_TRACKING_URI at one (it is {uri})")
    secret = load_secret(settings)
    print(register_webhook(MlflowClient(tracking_uri=uri, registry_uri=uri), args.url, args.name, secret))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oppen.mlflow_webhook_receiver",
                                     description="MLflow registry webhooks to Oppen's Prefect events.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="receive signed deliveries and emit Prefect events")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8765)
    register = commands.add_parser("register", help="create or update the MLflow webhook pointing here")
    register.add_argument("--url", required=True,
                          help=f"the receiver's address as MLflow's server reaches it, ending {WEBHOOK_PATH}")
    register.add_argument("--name", default="oppen-registry")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        (_serve if args.command == "serve" else _register)(args, load_settings())
    except ReceiverError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
