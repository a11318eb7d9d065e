"""The clients every API function uses: settings, the ledger, Prefect (sync) and MLflow.

Each is opened per call and closed on every exit. API functions are synchronous: the CLI calls
them directly, the MCP server runs them in a worker thread, and a REPL needs no event loop.
"""

from __future__ import annotations

import atexit
import functools
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from uuid import UUID

import httpx
from mlflow import MlflowClient
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.exceptions import ObjectNotFound
from sqlalchemy.exc import OperationalError

from oppen.api.errors import InvalidInput, NotFound, Unavailable
from oppen.cost.budgets import open_ledger
from oppen.cost.ledger import Ledger
from oppen.cost.price_book import PriceBook, load_price_book
from oppen.settings import OppenSettings, load_settings


def settings() -> OppenSettings:
    return load_settings()


_LEDGERS: dict[tuple[str, str], Ledger] = {}
_LEDGERS_LOCK = threading.Lock()


@contextmanager
def ledger(config: OppenSettings | None = None) -> Iterator[Ledger]:
    """The configured ledger, opened (schema checked, budgets applied when empty) once per process.

    A long-lived caller (the MCP server) would otherwise pay the schema check and a new connection
    pool on every call; the engine's pool is disposed when the process exits.
    """
    config = config or settings()
    key = (config.ledger, str(config.budgets_file or ""))
    with _LEDGERS_LOCK:
        opened = _LEDGERS.get(key)
        if opened is None:
            try:
                opened = open_ledger(config.ledger, config.budgets_file)
            except OperationalError as error:
                raise Unavailable(f"the budget ledger at {_redacted(config.ledger)} did not answer ({error.orig}); "
                                  "check OPPEN_LEDGER_URL") from None
            _LEDGERS[key] = opened
    try:
        yield opened
    except OperationalError as error:
        raise Unavailable(f"the budget ledger at {_redacted(config.ledger)} did not answer ({error.orig}); "
                          "check OPPEN_LEDGER_URL") from None


@atexit.register
def _dispose_ledgers() -> None:
    for opened in _LEDGERS.values():
        opened.dispose()


@contextmanager
def prefect() -> Iterator[SyncPrefectClient]:
    """The Prefect API named by PREFECT_API_URL; an unreachable server is one sentence, not a traceback.

    Without PREFECT_API_URL, Prefect would start a throwaway server with none of the deployments,
    runs or queues the user means: refused instead, saying how to point at theirs.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise Unavailable("no Prefect server is set: export PREFECT_API_URL (for the local stack: "
                          "eval \"$(.venv/bin/python -m oppen.local_stack env)\")")
    try:
        with get_client(httpx_settings={"verify": _tls_context()}, sync_client=True) as client:
            yield client
    except httpx.TransportError as error:
        raise Unavailable(f"the Prefect server at {url} did not answer ({type(error).__name__}); "
                          "start it (scripts/oppen-local.sh up) or set PREFECT_API_URL") from None


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The TLS context Prefect's client would build, built once: loading the CA bundle costs 40-130 ms,
    and Prefect builds it again for every client (every API call)."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=PREFECT_API_SSL_CERT_FILE.value() or certifi.where())


def mlflow(config: OppenSettings | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=(config or settings()).tracking_uri)


def price_book(config: OppenSettings | None = None) -> PriceBook:
    return load_price_book((config or settings()).price_book)


def flow_run_uuid(value: str) -> UUID:
    try:
        return UUID(str(value))
    except ValueError:
        raise InvalidInput(f"{value!r} is not a flow run id (a UUID such as 0f1e2d3c-...)") from None


def read_flow_run(client: SyncPrefectClient, flow_run_id: str):
    try:
        return client.read_flow_run(flow_run_uuid(flow_run_id))
    except ObjectNotFound:
        raise NotFound(f"no flow run {flow_run_id} on this Prefect server; `oppen queue` lists the pending ones") from None


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
