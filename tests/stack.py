"""A real Prefect server (and worker) on a free loopback port, for integration tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

from oppen.local_stack import PROJECT_DIR, free_port, prefect_server_argv, wait_prefect_healthy

BIN = Path(sys.executable).parent


def poll_until(predicate, timeout: float, interval: float = 0.2):
    """`predicate()`'s first truthy value within `timeout` seconds, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


class PrefectStack:
    """A server (SQLite by default), a worker and the environment their clients share.

    `server_env` goes to the server only: its database (`PREFECT_API_DATABASE_CONNECTION_URL`), lease
    storage and messaging settings (tests/prefect_backends.py builds them for PostgreSQL and Redis).
    """

    def __init__(self, root: Path, server_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.server_env = dict(server_env or {})
        self.server: subprocess.Popen | None = None
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ) | {
            "PREFECT_HOME": str(root / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "OPPEN_HOME": str(root / "oppen"),
            "OPPEN_MLFLOW_TRACKING_URI": self.tracking_uri,
            "OPPEN_PROJECT_DIR": str(PROJECT_DIR),
            "PYTHONUNBUFFERED": "1",
            # The local pool's flow runs start as `prefect flow-run execute`: this venv's prefect.
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            # `prefect deploy --all` also deploys the GPU pool's deployments; no container engine
            # here, so their build step names an image instead of building one.
            "OPPEN_SKIP_IMAGE_BUILD": "1",
            "OPPEN_IMAGE": "registry.example.com/oppen-train:test",
        }

    def spawn(self, name: str, argv: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        process = subprocess.Popen(argv, env=self.env | (env_extra or {}), cwd=PROJECT_DIR, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def start_server(self) -> None:
        """Start the server (again, after `stop_server`: same port, same database) and wait until it is healthy."""
        (self.root / "prefect").mkdir(parents=True, exist_ok=True)
        self.server = self.spawn("server", prefect_server_argv(self.port), self.server_env)
        wait_prefect_healthy(self.port, self.server, self.root / "server.log")

    def stop_server(self, timeout: float = 30) -> None:
        """SIGTERM to the server's process group, as Kubernetes stops a pod; the worker and flow runs go on."""
        server, self.server = self.server, None
        if server is None:
            return
        _terminate(server, timeout)
        self.processes.remove(server)

    def run(self, *argv: str, check: bool = True, timeout: float = 300,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env | (env_extra or {}), cwd=PROJECT_DIR, capture_output=True,
                              text=True, check=check, timeout=timeout)

    def prefect(self, *argv: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run(str(BIN / "prefect"), *argv, check=check, timeout=timeout)

    def start_worker(self, pool: str = "local") -> None:
        self.spawn("worker", [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"])

    def stop(self) -> None:
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except OSError:
                continue
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        time.sleep(0.2)

    def read_flow_run(self, flow_run_id: str):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def read():
            async with get_client() as client:
                return await client.read_flow_run(UUID(flow_run_id))

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            return asyncio.run(read())

    def wait_for(self, predicate, timeout: float, what: str):
        """Poll until `predicate()` gives something truthy; fail the test with the worker's log if it never does."""
        import pytest

        value = poll_until(predicate, timeout)
        if not value:
            pytest.fail(f"timed out waiting for {what}\n{self.log('worker')}")
        return value

    def final_state(self, flow_run_id: str, timeout: float = 300):
        def final():
            state = self.read_flow_run(flow_run_id).state
            return state if state.is_final() else None

        return self.wait_for(final, timeout, f"flow run {flow_run_id} to finish")

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-4000:] if path.exists() else ""


def _terminate(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to a process's group, SIGKILL after `timeout`, and wait until its leader is gone."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except OSError:
        pass
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
