"""Point this test process's Prefect clients at one server, including its background event and log senders.

Prefect keeps one events worker and one log worker per process, bound to the API they first saw:
after a test module talks to its own server, the next module's in-process flows would still send
their events and logs to the first (by then stopped) server. Draining both on every switch rebinds them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def drain_senders(timeout: float = 10.0) -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (EventsWorker, APILogWorker):
        service.drain_all(timeout=timeout)


@contextlib.contextmanager
def prefect_api(api_url: str) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    drain_senders()
    try:
        with temporary_settings({PREFECT_API_URL: api_url}):
            yield
    finally:
        drain_senders()
