"""A real `mlflow server` over an existing tracking store, owned by the test that starts it.

The integration stack (tests/stack.py) writes MLflow straight to a SQLite file; a user reads the same
runs through `mlflow server`'s UI. This starts one on a free loopback port over that file, the way
oppen/local_stack.py starts the embedded stack's server, and stops its whole process group (the CLI
forks uvicorn/gunicorn workers) on exit.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Self

from oppen.local_stack import PROJECT_DIR, free_port, wait_http
from tests.stack import BIN


class MlflowServer:
    """`mlflow server --backend-store-uri <store>` on 127.0.0.1:<free port>; a context manager.

    `default_artifact_root` should be where the store's writers put artifacts (for the test stack,
    `$OPPEN_HOME/mlartifacts`): anything the server itself creates then lands in the same place, and
    nothing lands in `./mlartifacts` of the working directory (the repository).
    """

    def __init__(self, backend_store_uri: str, default_artifact_root: str, log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.backend_store_uri = backend_store_uri
        self.default_artifact_root = default_artifact_root
        self.log = log
        self.env = env if env is not None else dict(os.environ)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", self.backend_store_uri, "--default-artifact-root", self.default_artifact_root,
                # The runs' artifacts are local files the browser reads through the server's REST API;
                # proxying (mlflow-artifacts:/) would only apply to experiments the server creates.
                "--no-serve-artifacts", "--workers", "1"]

    def start(self, timeout_s: float = 120) -> Self:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv(), env=self.env, cwd=PROJECT_DIR, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        # A store that has never been opened is migrated first (seconds on SQLite); allow plenty.
        wait_http(f"{self.url}/health", timeout_s, self.process, self.log)
        return self

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
