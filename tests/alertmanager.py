"""A real Alertmanager (Debian's /usr/bin/prometheus-alertmanager) for tests and benchmarks.

Its configuration is the committed infra/monitoring/alertmanager/alertmanager.yml with only the
receiver's address and token file replaced (and, where a test asks, the Oppen route's timings), so what
is tested is the routing that ships. Free port, clustering off, storage in the given directory.

    with Alertmanager(tmp_path, receiver_url="http://127.0.0.1:8766/alertmanager", token_file=path) as am:
        am.post_alerts([{"labels": {...}, "annotations": {...}}])
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from oppen.local_stack import PROJECT_DIR, free_port

BINARY = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
needs_alertmanager = pytest.mark.skipif(not Path(BINARY).exists(), reason="prometheus-alertmanager is absent: the "
                                        "alerting tier needs Debian's package (.ci/run installs it)")
CONFIG = PROJECT_DIR / "infra" / "monitoring" / "alertmanager" / "alertmanager.yml"
RECEIVER = "oppen-prefect"


def alertmanager_config(receiver_url: str, token_file: Path | None, route: dict[str, Any] | None = None) -> dict:
    """The committed configuration pointed at `receiver_url`; `route` overrides the Oppen route's fields."""
    config = yaml.safe_load(CONFIG.read_text())
    webhook = next(r for r in config["receivers"] if r["name"] == RECEIVER)["webhook_configs"][0]
    webhook["url"] = receiver_url
    if token_file is None:
        webhook.pop("http_config", None)
    else:
        webhook["http_config"]["authorization"]["credentials_file"] = str(token_file)
    oppen_route = next(r for r in config["route"]["routes"] if r["receiver"] == RECEIVER)
    oppen_route.update(copy.deepcopy(route or {}))
    return config


class Alertmanager:
    """Owns one Alertmanager process: started on enter, stopped (and waited for) on exit."""

    def __init__(self, root: Path, receiver_url: str, token_file: Path | None = None,
                 route: dict[str, Any] | None = None) -> None:
        self.root = root
        self.config = alertmanager_config(receiver_url, token_file, route)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Alertmanager:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config_file = self.root / "alertmanager.yml"
        config_file.write_text(yaml.safe_dump(self.config, sort_keys=False))
        log = open(self.root / "alertmanager.log", "ab")
        self.process = subprocess.Popen(
            [BINARY, f"--config.file={config_file}", f"--storage.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=debug"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Alertmanager exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Alertmanager was not ready within 30 s:\n{self.log()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """POST /api/v2/alerts, as Prometheus sends them (startsAt defaults to now)."""
        now = datetime.now(timezone.utc).isoformat()
        body = [{"startsAt": now, **alert} for alert in alerts]
        httpx.post(f"{self.url}/api/v2/alerts", json=body, timeout=10).raise_for_status()

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds (GET /api/v2/alerts): fingerprint, startsAt, status..."""
        response = httpx.get(f"{self.url}/api/v2/alerts", timeout=10)
        response.raise_for_status()
        return response.json()

    def log(self) -> str:
        path = self.root / "alertmanager.log"
        return path.read_text()[-4000:] if path.exists() else ""
