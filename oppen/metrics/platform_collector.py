"""The platform collector: polls Prefect and the ledger on an interval; a scrape serves the latest poll.

Polling on its own interval rather than per scrape keeps the cost on Prefect's server and the ledger
fixed (one poll every `--interval` seconds however many Prometheus replicas scrape, and a slow
Prefect never makes a scrape time out). Each source (queues, workers, budgets, outcomes) is polled
on its own: one that fails is left out of the scrape, with `oppen_exporter_poll_success{source}` 0,
rather than served stale as if current; the others are still served.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import Metric

from oppen.api.errors import ApiError
from oppen.metrics.families import Families
from oppen.metrics.platform_readings import (
    read_budgets,
    read_finished_runs,
    read_online_workers,
    read_queues,
)

log = logging.getLogger("oppen.metrics")

DEFAULT_READERS: dict[str, Callable[[], object]] = {
    "queues": read_queues,
    "workers": read_online_workers,
    "budgets": read_budgets,
    "outcomes": read_finished_runs,
}


@dataclass(frozen=True)
class PollResult:
    ok: bool
    seconds: float
    finished_at: float | None  # wall clock (Unix time) of the latest success


class PlatformCollector:
    """Holds the latest reading of each source; `poll` refreshes them, `collect` turns them into samples."""

    def __init__(self, readers: dict[str, Callable[[], object]] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.readers = dict(DEFAULT_READERS if readers is None else readers)
        self.wall_clock = wall_clock
        self.readings: dict[str, object] = {}
        self.results: dict[str, PollResult] = {}
        # A counter must never go down while this process serves it: Prefect's count of a deployment's
        # Failed runs drops when one is retried, or when old runs are deleted. Each series keeps its highest.
        # (These dicts are replaced on each poll, not changed in place: see _record.)
        self.finished: dict[tuple[str, str, str], int] = {}

    def poll(self) -> None:
        for source, read in self.readers.items():
            started = time.perf_counter()
            try:
                reading = read()
            except Exception as error:  # noqa: BLE001 - one source down must not stop the others, nor the exporter
                self._failed(source, error, time.perf_counter() - started)
                continue
            if source == "outcomes":
                self.finished = {**self.finished, **{key: max(self.finished.get(key, 0), count)
                                                     for key, count in reading.items()}}
            self.readings = {**self.readings, source: reading}
            if source in self.results and not self.results[source].ok:
                log.info("polling %s works again", source)
            self._record(source, PollResult(True, time.perf_counter() - started, self.wall_clock()))

    def _failed(self, source: str, error: Exception, seconds: float) -> None:
        previous = self.results.get(source)
        if previous is None or previous.ok:  # said once when it starts failing, not on every poll
            detail = str(error) if isinstance(error, ApiError) else f"{type(error).__name__}: {error}"
            log.warning("polling %s failed; its series are left out until it works: %s", source, detail,
                        exc_info=not isinstance(error, ApiError))
        self._record(source, PollResult(False, seconds, previous.finished_at if previous else None))

    def _record(self, source: str, result: PollResult) -> None:
        # Replaced, never changed in place: a scrape on the HTTP thread may be iterating the one it read.
        self.results = {**self.results, source: result}

    def fresh(self, source: str):
        """The source's reading when its latest poll worked, else None."""
        result = self.results.get(source)
        return self.readings.get(source) if result is not None and result.ok else None

    def collect(self) -> Iterator[Metric]:
        families = Families()
        self._collect_polls(families)
        for queue in self.fresh("queues") or []:
            labels = {"pool": queue.pool, "queue": queue.queue}
            families.add("oppen_queue_pending_runs", queue.pending, **labels)
            families.add("oppen_queue_late_runs", queue.late, **labels)
            families.add("oppen_queue_running_runs", queue.running, **labels)
            families.add("oppen_queue_oldest_wait_seconds", queue.oldest_wait_s, **labels)
            families.add("oppen_queue_queued_cost_usd", queue.queued_cost_usd, **labels)
            families.add("oppen_queue_held_usd", queue.held_usd, **labels)
        for pool, online in (self.fresh("workers") or {}).items():
            families.add("oppen_pool_online_workers", online, pool=pool)
        for budget in self.fresh("budgets") or []:
            # A team-wide budget has no experiment: the empty label value, which PromQL reads as the label absent.
            labels = {"team": budget.team, "experiment": budget.experiment or "", "period": budget.period}
            families.add("oppen_budget_amount_usd", budget.limit_usd, **labels)
            families.add("oppen_budget_spent_usd", budget.spent_usd, **labels)
            families.add("oppen_budget_held_usd", budget.held_usd, **labels)
        if self.fresh("outcomes") is not None:
            for (deployment, state_type, state_name), count in sorted(self.finished.items()):
                families.add("oppen_flow_runs_finished_total", count, deployment=deployment, state_type=state_type,
                             state_name=state_name)
        return iter(families)

    def _collect_polls(self, families: Families) -> None:
        for source, result in self.results.items():
            families.add("oppen_exporter_poll_success", 1 if result.ok else 0, source=source)
            families.add("oppen_exporter_poll_duration_seconds", result.seconds, source=source)
            if result.finished_at is not None:
                families.add("oppen_exporter_last_success_timestamp_seconds", result.finished_at, source=source)
