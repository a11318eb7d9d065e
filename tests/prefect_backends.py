"""A Prefect server's production backends, for integration tests: PostgreSQL and Redis messaging.

`production_stack` starts a PrefectStack whose server keeps its tables in a PostgreSQL database of its
own (created here, dropped afterwards) and, with `redis=True`, its events, causal ordering, concurrency
leases, background-service scheduling (Docket) and worker cleanup queue in a Redis database of its own,
as several server replicas need (infra/helm/prefect-server-values.yaml). The budget ledger goes to
PostgreSQL too, in a schema of its own. Without OPPEN_TEST_POSTGRES_URL (or, for Redis,
OPPEN_TEST_REDIS_URL) the tests that need them are skipped, and say why.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from sqlalchemy import create_engine, make_url, text

from tests.postgres import postgres_base, postgres_schema
from tests.stack import BIN, PrefectStack

REDIS_ENV = "OPPEN_TEST_REDIS_URL"
# Marks a Redis database as taken by one test server: prefect-redis names its streams and keys without
# a prefix of ours ("events", "triggers:seen:<id>"), so two servers sharing a database read each other's events.
REDIS_CLAIM_KEY = "oppen:test:claimed-by"


def redis_base(needed_for: str) -> str:
    base = os.environ.get(REDIS_ENV)
    if not base:
        pytest.skip(f"{REDIS_ENV} is not set: {needed_for} needs Redis (.ci/run sets it)")
    return base


@contextmanager
def prefect_database(base_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one Prefect server, as the asyncpg URL Prefect wants; dropped afterwards."""
    name = f"oppen_prefect_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")  # CREATE/DROP DATABASE refuse a transaction
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(base_url).set(drivername="postgresql+asyncpg", database=name,
                                         query={}).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:  # FORCE: a server that did not stop cleanly still holds connections
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@contextmanager
def redis_database(base_url: str) -> Iterator[str]:
    """The URL of an empty Redis database (1-15; 0 is left to people) claimed for this server, flushed afterwards."""
    import redis

    parts = urlsplit(base_url)
    token = f"{os.getpid()}:{uuid.uuid4().hex}"
    for db in range(1, 16):
        url = urlunsplit(parts._replace(path=f"/{db}"))
        client = redis.Redis.from_url(url)
        # SET NX after an empty DBSIZE: of two servers that both saw it empty, one gets it.
        if client.dbsize() == 0 and client.set(REDIS_CLAIM_KEY, token, nx=True):
            break
        client.close()
    else:
        pytest.fail(f"no empty Redis database on {parts.netloc} for a test Prefect server (databases 1-15 hold data)")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


# A single server without Redis keeps its concurrency leases (the `gpu-slots` a GPU run holds) in files under
# PREFECT_HOME. Prefect's default keeps them in memory: a restarted server forgets them, and the slots they
# held are never given back (tests/test_integration_server_restart.py shows both).
FILESYSTEM_LEASES = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}


def redis_messaging_env(url: str) -> dict[str, str]:
    """Every server setting that is per-process memory by default, moved to Redis (what `prefect server
    start --workers N` insists on, plus Docket and the worker cleanup queue, which have URLs of their own)."""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
        "PREFECT_REDIS_MESSAGING_URL": url,
        "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL": url,
        "PREFECT_SERVER_DOCKET_URL": url,
    }


@contextmanager
def started_stack(root: Path, mnist_dir: Path, server_env: dict[str, str] | None = None,
                  env: dict[str, str] | None = None) -> Iterator[PrefectStack]:
    """A stack of its own, started like conftest's `stack`: pools, `prefect deploy --all`, a process worker."""
    stack = PrefectStack(root, server_env=server_env)
    stack.env |= {"OPPEN_MNIST_DIR": str(mnist_dir)} | (env or {})
    try:
        stack.start_server()
        for step in ([sys.executable, "-m", "work_pools.apply"],
                     [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"]):
            done = stack.run(*step, check=False)
            if done.returncode:
                pytest.fail(f"{' '.join(step[-3:])} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


@contextmanager
def production_stack(root: Path, mnist_dir: Path, *, redis: bool) -> Iterator[PrefectStack]:
    """`started_stack` with the server on PostgreSQL (and Redis messaging), the ledger on PostgreSQL."""
    pg_base = postgres_base("a Prefect server on PostgreSQL")
    redis_url = redis_base("a Prefect server with Redis messaging") if redis else None
    with ExitStack() as backends:
        server_env = {"PREFECT_API_DATABASE_CONNECTION_URL": backends.enter_context(prefect_database(pg_base))}
        if redis_url:
            server_env |= redis_messaging_env(backends.enter_context(redis_database(redis_url)))
        ledger_url = backends.enter_context(postgres_schema(pg_base, prefix="oppen_ledger"))
        # The stack stops before its database is dropped under it (ExitStack unwinds in reverse).
        yield backends.enter_context(started_stack(root, mnist_dir, server_env, {"OPPEN_LEDGER_URL": ledger_url}))
