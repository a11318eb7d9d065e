"""MetricSink: training never waits for MLflow, and an outage loses no metric point silently."""

from __future__ import annotations

import threading
import time

from tasks.metric_sink import MetricSink


class RecordingClient:
    """Stands in for MlflowClient: fails its first `failures` batches, then keeps every point it is sent."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        self.received: list[tuple[str, int]] = []

    def log_batch(self, run_id: str, metrics: list, synchronous: bool = True) -> None:
        assert run_id == "run-1" and synchronous
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionError("MLflow unreachable")
        self.received += [(metric.key, metric.step) for metric in metrics]


class HangingClient(RecordingClient):
    """A log_batch that blocks until released (a server that accepts the connection and never answers)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def log_batch(self, run_id: str, metrics: list, synchronous: bool = True) -> None:
        self.entered.set()
        self.release.wait(30)
        super().log_batch(run_id, metrics, synchronous)


def _log_steps(sink: MetricSink, steps: range) -> list[tuple[str, int]]:
    logged = []
    for step in steps:
        sink.log({"loss": 1.0 / (step + 1), "lr": 0.1}, step=step)
        logged += [("loss", step), ("lr", step)]
    return logged


def test_points_logged_during_an_outage_arrive_once_and_in_order_when_it_ends():
    client = RecordingClient(failures=4)
    sink = MetricSink(client, "run-1", interval_s=0.01, max_backoff_s=0.05)
    logged = _log_steps(sink, range(0, 700))  # 1400 points: more than one batch of 1000
    time.sleep(0.05)
    logged += _log_steps(sink, range(700, 900))
    report = sink.close(timeout_s=10)
    assert client.received == logged  # every point, once, in the order it was logged
    assert report.complete and report.sent == len(logged) == 1800
    assert report.failures == 4 and report.dropped == report.unsent == 0
    assert "after 4 failed attempts" in report.describe()


def test_close_gives_up_at_its_deadline_and_reports_the_gap():
    client = RecordingClient(failures=10**9)
    sink = MetricSink(client, "run-1", interval_s=0.01, max_backoff_s=0.05)
    logged = _log_steps(sink, range(5, 55))
    started = time.monotonic()
    report = sink.close(timeout_s=0.3)
    assert time.monotonic() - started < 1.0
    assert (report.sent, report.unsent, report.dropped) == (0, len(logged), 0)
    assert (report.first_gap_step, report.last_gap_step) == (5, 54)
    assert report.failures >= 1 and not report.complete
    assert report.describe().startswith("100 metric points did not reach MLflow (steps 5-54): ConnectionError")


def test_the_buffer_bound_drops_the_oldest_points_and_counts_them():
    client = RecordingClient()
    sink = MetricSink(client, "run-1", max_points=100, interval_s=60)  # nothing is sent before close()
    logged = _log_steps(sink, range(0, 125))  # 250 points
    report = sink.close(timeout_s=5)
    assert client.received == logged[150:]  # the newest 100
    assert (report.sent, report.dropped, report.unsent) == (100, 150, 0)
    assert (report.first_gap_step, report.last_gap_step) == (0, 74)
    assert not report.complete


def test_log_never_blocks_while_mlflow_hangs():
    client = HangingClient()
    sink = MetricSink(client, "run-1", interval_s=0.01, max_backoff_s=0.05)
    sink.log({"loss": 1.0}, step=0)
    assert client.entered.wait(5)  # the sender is now stuck inside log_batch, for up to 30 s
    started = time.monotonic()
    for step in range(1, 20_001):
        sink.log({"loss": 1.0}, step=step)
    # ~0.1 s here; a bound far below the hang, loose enough for a loaded CI machine's scheduling and GC.
    assert time.monotonic() - started < 5.0, "log() waited for MLflow"
    started = time.monotonic()
    report = sink.close(timeout_s=0.2)
    assert time.monotonic() - started < 1.0
    assert (report.sent, report.unsent) == (0, 20_001)  # the batch in flight counts as a gap: it may never arrive
    client.release.set()
    sink._thread.join(5)
    assert not sink._thread.is_alive() and report.sent == 0  # a late answer does not rewrite the report
