"""Metrics to one MLflow run without blocking or failing training, and without losing them to an outage.

Training callbacks hand metrics to `MetricSink.log`, which only appends to a buffer. A
background thread sends the buffer in batches; when MLflow cannot be reached, the batch goes
back to the front of the buffer and is retried with backoff, so the metrics arrive once MLflow
is back. `close()` flushes what it can within a deadline and reports the rest: a gap is
recorded (how many points, which steps, why), never silently dropped. The buffer is bounded:
past `max_points` the oldest points are dropped and counted.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from mlflow import MlflowClient
from mlflow.entities import Metric

BATCH = 1000  # MLflow's limit on metrics per log_batch


@dataclass
class SinkReport:
    sent: int = 0
    dropped: int = 0  # lost to the buffer bound during a long outage
    unsent: int = 0  # still buffered when close() gave up
    failures: int = 0  # batches that failed (and were retried)
    first_gap_step: int | None = None
    last_gap_step: int | None = None
    last_error: str | None = None
    outage_seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.dropped == 0 and self.unsent == 0

    def describe(self) -> str:
        if self.complete:
            extra = f" after {self.failures} failed attempts ({self.outage_seconds:.0f} s unreachable)" if self.failures else ""
            return f"all {self.sent} metric points reached MLflow{extra}"
        return (f"{self.dropped + self.unsent} metric points did not reach MLflow (steps {self.first_gap_step}-"
                f"{self.last_gap_step}): {self.last_error}")


@dataclass
class _State:
    points: deque = field(default_factory=deque)
    in_flight: list = field(default_factory=list)
    closing: bool = False
    abandoned: bool = False  # close() stopped waiting: the thread must not touch the report any more


class MetricSink:
    def __init__(self, client: MlflowClient, run_id: str, *, max_points: int = 200_000, interval_s: float = 1.0,
                 max_backoff_s: float = 15.0) -> None:
        self.client, self.run_id = client, run_id
        self.max_points, self.interval_s, self.max_backoff_s = max_points, interval_s, max_backoff_s
        self.report = SinkReport()
        self._state = _State()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._down_since: float | None = None
        self._thread = threading.Thread(target=self._run, name=f"mlflow-sink-{run_id[:8]}", daemon=True)
        self._thread.start()

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            for key, value in metrics.items():
                self._state.points.append(Metric(key, float(value), now, step))
            while len(self._state.points) > self.max_points:
                self._note_gap(self._state.points.popleft(), dropped=True)

    def close(self, timeout_s: float = 30.0) -> SinkReport:
        """Send what is buffered, waiting at most `timeout_s`; what is left is counted as a gap."""
        with self._lock:
            self._state.closing = True
        self._wake.set()
        self._thread.join(timeout_s)
        with self._lock:
            self._state.abandoned = True
            # A batch still in flight may yet arrive; counted as a gap, the conservative reading.
            for point in [*self._state.in_flight, *self._state.points]:
                self._note_gap(point, dropped=False)
            self._state.points.clear()
        return self.report

    # --- the sending thread ----------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.interval_s
        while True:
            self._wake.wait(backoff)
            self._wake.clear()
            with self._lock:
                if self._state.abandoned:
                    return
                batch = [self._state.points.popleft() for _ in range(min(BATCH, len(self._state.points)))]
                self._state.in_flight = batch
                closing = self._state.closing
            if batch and not self._send(batch):
                backoff = min(self.max_backoff_s, backoff * 2)
                continue
            backoff = self.interval_s
            with self._lock:
                if closing and not self._state.points:
                    return
                more = bool(self._state.points)
            if more:
                self._wake.set()

    def _send(self, batch: list[Metric]) -> bool:
        try:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
        except Exception as error:  # MLflow down, slow, or restarting: keep the points, try again later
            with self._lock:
                self._state.in_flight = []
                if self._state.abandoned:
                    return False
                self._state.points.extendleft(reversed(batch))
                self.report.failures += 1
                self.report.last_error = f"{type(error).__name__}: {str(error)[:200]}"
                self._down_since = self._down_since or time.monotonic()
            return False
        with self._lock:
            self._state.in_flight = []
            if self._state.abandoned:
                return True
            self.report.sent += len(batch)
            if self._down_since is not None:
                self.report.outage_seconds += time.monotonic() - self._down_since
                self._down_since = None
        return True

    def _note_gap(self, point: Metric, dropped: bool) -> None:
        if dropped:
            self.report.dropped += 1
        else:
            self.report.unsent += 1
        first = self.report.first_gap_step
        self.report.first_gap_step = point.step if first is None else min(first, point.step)
        self.report.last_gap_step = max(self.report.last_gap_step or point.step, point.step)
