"""Prometheus file-based service discovery for runs on one machine: one JSON file per run in flight.

A run writes `<targets dir>/<flow-run-id>.json` when its exporter listens and removes it on every exit,
so Prometheus (`file_sd_configs` on `*.json`, infra/monitoring/scrape/prometheus-local.yml) scrapes
exactly the runs that are alive. Files are written whole and renamed into place, because Prometheus
watches the directory and would otherwise read half a file. A process killed with SIGKILL cannot
remove its file: the file records its pid and host (as `__meta_` labels, which Prometheus drops
after relabelling), and the next run on the machine prunes files whose process is gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

import psutil

log = logging.getLogger("oppen.metrics")

PID_LABEL = "__meta_oppen_pid"
HOST_LABEL = "__meta_oppen_host"


def target_path(directory: Path, flow_run_id: str) -> Path:
    return directory / f"{flow_run_id}.json"


def write_target(directory: Path, flow_run_id: str, address: str) -> Path:
    """Publish `address` (host:port) as this run's scrape target; returns the file written."""
    directory.mkdir(parents=True, exist_ok=True)
    path = target_path(directory, flow_run_id)
    group = [{"targets": [address], "labels": {PID_LABEL: str(os.getpid()), HOST_LABEL: socket.gethostname()}}]
    staging = directory / f".{path.name}.{os.getpid()}.tmp"  # not *.json: Prometheus never reads it
    staging.write_text(json.dumps(group))
    os.replace(staging, path)
    return path


def remove_target(path: Path) -> None:
    """Remove this process's target. A file another process wrote since (the next attempt of the same run,
    rescheduled while this one was still exiting) is left alone: it is that attempt's target now."""
    if _writer(path) == (os.getpid(), socket.gethostname()):
        path.unlink(missing_ok=True)


def _writer(path: Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a target file; None when it is missing or not one of ours."""
    try:
        labels = json.loads(path.read_text())[0]["labels"]
        return int(labels[PID_LABEL]), labels[HOST_LABEL]
    except (OSError, ValueError, LookupError, TypeError):
        return None


def prune_stale_targets(directory: Path) -> list[Path]:
    """Remove the targets of runs on this host whose process is gone (killed without cleaning up)."""
    if not directory.is_dir():
        return []
    host, pruned = socket.gethostname(), []
    for path in directory.glob("*.json"):
        writer = _writer(path)  # None: not one of ours, or being replaced right now: left alone
        if writer is not None and writer[1] == host and not psutil.pid_exists(writer[0]):
            path.unlink(missing_ok=True)
            pruned.append(path)
    if pruned:
        log.info("removed %d metrics target(s) left by runs that were killed: %s", len(pruned),
                 ", ".join(p.stem for p in pruned))
    return pruned
