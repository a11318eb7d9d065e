"""The platform exporter: one long-running process next to Prefect's server, serving `oppen_queue_*`,
`oppen_pool_*`, `oppen_budget_*` and `oppen_flow_runs_finished_total` for Prometheus.

    python -m oppen.metrics.platform_exporter serve [--host 127.0.0.1] [--port 8780] [--interval 30]

It reads the Prefect server named by PREFECT_API_URL and the ledger (OPPEN_LEDGER_URL) every
`--interval` seconds (platform_collector.py) and serves the latest poll at /metrics, beside Prefect's
own /api/metrics (PREFECT_SERVER_METRICS_ENABLED=true). Its labels are pools, queues, teams,
experiments and deployments: bounded by configuration, never by runs, which is why it can be one
central process while run metrics come from the runs themselves (run_exporter.py).

Prefect or the ledger being down does not stop it: the affected series are left out and
`oppen_exporter_poll_success{source}` says so. It stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from oppen.metrics.platform_collector import PlatformCollector

log = logging.getLogger("oppen.metrics")

DEFAULT_PORT = 8780  # beside the webhook receiver (8765) and the MCP server (8770)
# Queue and budget figures change over minutes; 30 s matches a usual scrape interval and costs Prefect's
# server a few queries (one per deployment for the outcomes) twice a minute.
DEFAULT_INTERVAL_S = 30.0


class PlatformExporterOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on (0.0.0.0 in a pod).")
    port: int = Field(DEFAULT_PORT, ge=0, le=65535, description="Port to listen on; 0: a free one (printed).")
    interval_s: float = Field(DEFAULT_INTERVAL_S, ge=1, le=3600, description="Seconds between polls.")


class PlatformExporter:
    """Polls on a daemon thread and serves on another, between `__enter__` and `__exit__`."""

    def __init__(self, options: PlatformExporterOptions, collector: PlatformCollector | None = None) -> None:
        self.options = options
        self.collector = collector or PlatformCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        ProcessCollector(registry=self.registry)  # the exporter's own CPU and memory (process_*)
        self.port: int | None = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._server = None
        self._server_thread = None

    def __enter__(self) -> PlatformExporter:
        self._server, self._server_thread = start_http_server(self.options.port, addr=self.options.host,
                                                              registry=self.registry)
        self.port = self._server.server_address[1]
        self._poller = threading.Thread(target=self._poll_forever, name="oppen-platform-poller", daemon=True)
        self._poller.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server_thread.join(timeout=10)
        if self._poller is not None:
            self._poller.join(timeout=60)  # a poll in flight finishes (its requests have their own timeouts)
        return False

    def wait(self) -> None:
        """Block until `stop` (a signal handler calls it)."""
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.collector.poll()
            # A poll starts every interval; one that took longer is followed by the next at once.
            self._stop.wait(max(0.0, self.options.interval_s - (time.monotonic() - started)))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m oppen.metrics.platform_exporter",
                                     description="Serve Oppen's queue, budget and outcome metrics for Prometheus.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="poll Prefect and the ledger, serve /metrics")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on; 0: a free one")
    serve.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between polls")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = PlatformExporterOptions(host=args.host, port=args.port, interval_s=args.interval)
    except ValidationError as error:
        first = error.errors()[0]
        print(f"error: --{str(first['loc'][0]).removesuffix('_s')}: {first['msg']}", file=sys.stderr)
        return 2
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("error: PREFECT_API_URL is unset; point it at the Prefect server to watch (for the local stack: "
              "eval \"$(.venv/bin/python -m oppen.local_stack env)\")", file=sys.stderr)
        return 2
    exporter = PlatformExporter(options)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: exporter.stop())
    try:
        exporter.__enter__()
    except OSError as error:
        print(f"error: cannot listen on {options.host}:{options.port}: {error.strerror or error}", file=sys.stderr)
        return 1
    try:
        print(f"serving platform metrics on http://{options.host}:{exporter.port}/metrics, polling "
              f"{PREFECT_API_URL.value()} and the ledger every {options.interval_s:g} s", flush=True)
        exporter.wait()
    finally:
        exporter.__exit__(None, None, None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
