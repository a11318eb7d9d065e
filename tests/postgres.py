"""The test PostgreSQL (this machine's, trust auth): each test's tables in a schema of its own, dropped after.

`.ci/run` sets OPPEN_TEST_POSTGRES_URL; without it the PostgreSQL variants are skipped, and say why.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text

PG_ENV = "OPPEN_TEST_POSTGRES_URL"


def postgres_base(needed_for: str) -> str:
    """The server's URL, or a visible skip naming what needed it."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set: {needed_for} needs PostgreSQL (.ci/run sets it)")
    return base


def with_search_path(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@contextmanager
def postgres_schema(base_url: str, prefix: str = "oppen_test") -> Iterator[str]:
    """A URL whose tables live in a fresh schema, dropped afterwards even when the test fails."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url)
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield with_search_path(base_url, schema)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()
