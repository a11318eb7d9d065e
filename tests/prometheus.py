"""A real Prometheus (/usr/bin/prometheus) for tests: a generated config, a temporary TSDB, a free port.

    with PrometheusServer(tmp_path, scrape_configs) as prometheus:
        prometheus.wait_for('oppen_training_step{flow_run_id="..."}')

Stopped (its whole process group) and its storage removed on every exit of the block.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from oppen.local_stack import PROJECT_DIR, free_port
from tests.stack import poll_until

BINARY = shutil.which("prometheus") or "/usr/bin/prometheus"
needs_prometheus = pytest.mark.skipif(not Path(BINARY).exists(),
                                      reason="prometheus is not installed (.ci/run installs the Debian package)")


LOCAL_CONFIG = PROJECT_DIR / "infra" / "monitoring" / "scrape" / "prometheus-local.yml"


def local_scrape_configs(runs_dir: Path | None = None, exporter: str | None = None,
                         prefect: str | None = None) -> list[dict]:
    """The committed local scrape jobs (prometheus-local.yml), pointed at this test's targets dir and addresses.

    A job whose address is not given is left out. Job names, paths and discovery stay as committed, so a
    test through this scrapes the way a user's Prometheus would.
    """
    jobs = {job["job_name"]: job for job in yaml.safe_load(LOCAL_CONFIG.read_text())["scrape_configs"]}
    chosen = []
    if runs_dir is not None:
        job = jobs["oppen-runs"]
        for discovery in job["file_sd_configs"]:
            discovery["files"] = [str(runs_dir / Path(pattern).name) for pattern in discovery["files"]]
        chosen.append(job)
    for name, address in (("oppen-exporter", exporter), ("prefect-server", prefect)):
        if address is not None:
            jobs[name]["static_configs"] = [{"targets": [address]}]
            chosen.append(jobs[name])
    return chosen


class PrometheusServer:
    def __init__(self, root: Path, scrape_configs: list[dict], scrape_interval: str = "1s") -> None:
        self.root = root / "prometheus"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {"global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                                  "evaluation_interval": scrape_interval},
                       "scrape_configs": scrape_configs}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> PrometheusServer:
        self.root.mkdir(parents=True)
        config = self.root / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config))
        log = open(self.root / "prometheus.log", "wb")
        self.process = subprocess.Popen(
            [BINARY, f"--config.file={config}", f"--storage.tsdb.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if not poll_until(self._ready, timeout=60):
                raise RuntimeError(f"prometheus did not become ready:\n{self.log()}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root / "data", ignore_errors=True)
        return False

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def api(self, path: str, **params: str) -> dict | list:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """An instant query's vector: [{"metric": {labels}, "value": [time, "value"]}, ...]."""
        return self.api("query", query=promql)["result"]

    def wait_for(self, promql: str, timeout: float = 60) -> list[dict]:
        """The query's result once it is non-empty; fails the test (with Prometheus' view of its targets) if never."""
        result = poll_until(lambda: self.query(promql), timeout, interval=0.5)
        if not result:
            pytest.fail(f"Prometheus never returned {promql} within {timeout} s; targets: "
                        f"{json.dumps(self.active_targets(), indent=1)[:3000]}\n{self.log()[-2000:]}")
        return result

    def active_targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]

    def log(self) -> str:
        path = self.root / "prometheus.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def value(sample: dict) -> float:
    return float(sample["value"][1])
