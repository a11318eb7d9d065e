"""The embedded default on one machine: Prefect server (SQLite), MLflow (SQLite + local artifacts),
the `local` process pool with its queues, the deployments, a worker, the MLflow registry webhook
receiver (a version registered or aliased in MLflow, by a flow or by hand in its UI, becomes an Oppen
event, and promote-model's trigger runs on it) and the automations of automations.yaml.

    python -m oppen.local_stack up      # start everything (idempotent: reuses what is running)
    python -m oppen.local_stack demo    # up, then run train-mnist/local, follow its story, print its summary
    python -m oppen.local_stack status
    python -m oppen.local_stack down    # stop what `up` started
    eval "$(python -m oppen.local_stack env)"   # point this shell's prefect/mlflow CLIs at the stack

State (databases, artifacts, logs, pids) lives under $OPPEN_HOME (default .oppen/); the webhook's
HMAC secret and MLflow's key for stored webhook secrets are made once, in $OPPEN_HOME/secrets/ (0600).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from oppen.settings import load_settings

PROJECT_DIR = Path(__file__).resolve().parent.parent
PREFERRED_PORTS = {"prefect": 4200, "mlflow": 5000, "receiver": 8765}
SERVICES = ("prefect", "mlflow", "worker", "receiver")
WEBHOOK_NAME = "oppen-registry"
# What MLflow's server needs to deliver registry webhooks to the receiver on this machine.
MLFLOW_WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",  # the receiver is plain http on loopback
    # This switches off MLflow's SSRF check (webhooks to private and loopback addresses): fine for this
    # loopback-only embedded stack, whose MLflow and receiver listen on 127.0.0.1 only.
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    # MLflow caches the webhook list this long (default 60 s): a webhook registered by `up` is seen in 5.
    "MLFLOW_WEBHOOK_CACHE_TTL": "5",
}
# Stack state that says how a running MLflow was started: an MLflow from before the webhooks is restarted.
MLFLOW_FLAVOUR = "webhooks-v1"
# The server's own settings. Concurrency leases (the `gpu-slots` a GPU run holds) live in memory by default:
# a server restart would forget them, the run's release would find no lease, and the slots would stay taken
# for good; on disk they outlive a restart (tests/test_integration_server_restart.py). A setting already in
# the environment wins. Its /api/metrics (process and worker-channel series) is on, for Prometheus.
PREFECT_SERVER_ENV = {"PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem",
                      "PREFECT_SERVER_METRICS_ENABLED": "true"}
# Poll often: the default 10 s query interval is most of a short run's dispatch latency.
WORKER_QUERY_SECONDS = "2"
# The servers share the machine with training: at normal priority their background services
# took ~10% of a 2-core training run's time (bench/overhead.py); niced, they yield to it.
# The worker is not niced: the flow-run processes it starts would inherit its priority.
SERVICE_NICENESS = 10


def lower_priority() -> None:
    """preexec_fn for co-located services: run at lower CPU priority than training."""
    os.nice(SERVICE_NICENESS)


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prefect_server_argv(port: int) -> list[str]:
    """`prefect server start` on a loopback port, as every local server here is started."""
    return [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]


def wait_prefect_healthy(port: int, process: subprocess.Popen, log: Path) -> None:
    # Fresh SQLite databases run their migrations first: ~13 s measured, so allow plenty.
    wait_http(f"http://127.0.0.1:{port}/api/health", 120, process, log)


def free_port(preferred: int | None = None) -> int:
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            # As the servers bind: a port whose last connections linger in TIME_WAIT (a stack just
            # stopped) is free to them; one with a listener is not (Linux refuses that bind regardless).
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free loopback port")


def wait_http(url: str, timeout_s: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"process for {url} exited with {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f}s" + (f"; see {log}" if log else ""))


def _reap(pid: int) -> None:
    """Collect a service that exited, when this process started it (`up` then `down` in one process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def group_alive(pgid: int) -> bool:
    """Whether a process of the service's group still runs (each service leads a session of its own).

    Zombies do not count: a service stopped by another process (`oppen-local.sh down`) leaves its
    children to init, and a container's init may never reap them.
    """
    _reap(pgid)
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (OSError, psutil.Error):
            continue
    return False


class LocalStack:
    def __init__(self, home: Path) -> None:
        self.home = home.resolve()
        self.state_file = self.home / "stack.json"
        self.logs = self.home / "logs"

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def _save(self, state: dict) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(state, indent=2))

    def _alive(self, name: str) -> bool:
        pid = self.state().get("pids", {}).get(name)
        if not pid:
            return False
        _reap(pid)  # a service this process started and that exited is a zombie until collected
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True

    def env(self) -> dict[str, str]:
        """The environment every Prefect/MLflow client of this stack needs."""
        state = self.state()
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.home / "prefect"),
            PREFECT_API_URL=f"http://127.0.0.1:{state['ports']['prefect']}/api",
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            OPPEN_HOME=str(self.home),
            OPPEN_MLFLOW_TRACKING_URI=f"http://127.0.0.1:{state['ports']['mlflow']}",
            OPPEN_PROJECT_DIR=str(PROJECT_DIR),
            PYTHONUNBUFFERED="1",
            # The local pool starts flow runs with `prefect flow-run execute` (work_pools/local.json):
            # this interpreter's `prefect` must come first on the worker's PATH.
            PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        )
        return env

    # -- secrets ---------------------------------------------------------------------------------
    def _persisted_secret(self, name: str, generate) -> str:
        """A secret made once and kept in home/secrets/NAME (0600); never printed or logged."""
        directory = self.home / "secrets"
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o700)
        path = directory / name
        try:
            # O_EXCL: of two `up`s racing, one writes and the other reads what it wrote.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            path.chmod(0o600)
            value = path.read_text().strip()
            if not value:
                raise SystemExit(f"{path} is empty; delete it and run `up` again to make a new one") from None
            return value
        with os.fdopen(fd, "w") as file:
            file.write(generate() + "\n")
        return path.read_text().strip()

    def webhook_secret(self) -> str:
        """The HMAC secret MLflow signs deliveries with and the receiver checks."""
        return self._persisted_secret("mlflow-webhook-secret", lambda: secrets.token_urlsafe(32))

    def webhook_encryption_key(self) -> str:
        """MLflow's Fernet key for the webhook secrets it stores: kept, or a restarted MLflow could not read them."""
        def generate() -> str:
            from cryptography.fernet import Fernet

            return Fernet.generate_key().decode()

        return self._persisted_secret("mlflow-webhook-encryption-key", generate)

    def receiver_url(self) -> str:
        from oppen.mlflow_webhook_receiver import WEBHOOK_PATH

        return f"http://127.0.0.1:{self.state()['ports']['receiver']}{WEBHOOK_PATH}"

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], niced: bool = False) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        # A session of its own: it outlives this command, and `down` can stop it with its children.
        process = subprocess.Popen(argv, env=env, cwd=PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=lower_priority if niced else None)
        state = self.state()
        state.setdefault("pids", {})[name] = process.pid
        self._save(state)
        return process

    # -- lifecycle -----------------------------------------------------------------------------
    def up(self) -> dict:
        state = self.state()
        if not (self._alive("prefect") and self._alive("mlflow")):
            self.down(quiet=True)
            state = {"ports": {name: free_port(port) for name, port in PREFERRED_PORTS.items()}, "pids": {}}
            self._save(state)
        if state.get("mlflow_flavour") != MLFLOW_FLAVOUR and self._alive("mlflow"):
            print("restarting MLflow with registry webhooks enabled")
            self._stop(["mlflow"], quiet=True)
        if not self._alive("receiver"):
            # A stack from before the receiver has no port for it; a port taken since is replaced.
            state = self.state()
            state["ports"]["receiver"] = free_port(state["ports"].get("receiver", PREFERRED_PORTS["receiver"]))
            self._save(state)
        webhook_secret, encryption_key = self.webhook_secret(), self.webhook_encryption_key()
        env = self.env()
        state = self.state()
        ports = state["ports"]
        (self.home / "prefect").mkdir(parents=True, exist_ok=True)
        if not self._alive("prefect"):
            print(f"starting Prefect server on 127.0.0.1:{ports['prefect']} (SQLite under {self.home / 'prefect'})")
            proc = self._spawn("prefect", prefect_server_argv(ports["prefect"]), PREFECT_SERVER_ENV | env, niced=True)
            wait_prefect_healthy(ports["prefect"], proc, self.logs / "prefect.log")
        if not self._alive("mlflow"):
            print(f"starting MLflow on 127.0.0.1:{ports['mlflow']} (SQLite + {self.home / 'mlartifacts'})")
            proc = self._spawn("mlflow", [
                _bin("mlflow"), "server", "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
                "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
                "--artifacts-destination", str(self.home / "mlartifacts"), "--workers", "1",
            ], env | MLFLOW_WEBHOOK_ENV | {"MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": encryption_key}, niced=True)
            wait_http(f"http://127.0.0.1:{ports['mlflow']}/health", 120, proc, self.logs / "mlflow.log")
            state = self.state()
            state["mlflow_flavour"] = MLFLOW_FLAVOUR
            self._save(state)
        # The receiver alone holds the secret (the worker and its flow runs do not need it). Started now,
        # it gets ready while the pools and deployments are applied.
        receiver_env = env | {"OPPEN_MLFLOW_WEBHOOK_SECRET": webhook_secret}
        receiver = None
        if not self._alive("receiver"):
            print(f"starting the MLflow webhook receiver on 127.0.0.1:{ports['receiver']} (events to Prefect)")
            receiver = self._spawn("receiver", [sys.executable, "-m", "oppen.mlflow_webhook_receiver", "serve",
                                                "--host", "127.0.0.1", "--port", str(ports["receiver"])],
                                   receiver_env, niced=True)
        subprocess.run([sys.executable, "-m", "work_pools.apply"], env=env, cwd=PROJECT_DIR, check=True)
        # The GPU pool's deployments are registered too (no worker serves them here); their image
        # build step only names the image: `up` must not build or push a multi-GB image each time.
        deploy_env = env | {"OPPEN_SKIP_IMAGE_BUILD": "1"}
        subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--all"], env=deploy_env, cwd=PROJECT_DIR, check=True,
                       stdout=subprocess.DEVNULL)
        print("deployed prefect.yaml: */local on the local pool (and */gpu* for the kubernetes-gpu pool, not served here)")
        if not self._alive("worker"):
            worker_env = env | {"PREFECT_WORKER_QUERY_SECONDS": WORKER_QUERY_SECONDS}
            self._spawn("worker", [_bin("prefect"), "worker", "start", "--pool", "local", "--type", "process",
                                   "--name", "oppen-local-worker"], worker_env)
            print("started a process worker on pool 'local'")
        wait_http(f"http://127.0.0.1:{ports['receiver']}/healthz", 60, receiver, self.logs / "receiver.log")
        self._register_webhook(receiver_env)
        self._apply_automations(env)
        print(f"Prefect UI: http://127.0.0.1:{ports['prefect']}   MLflow UI: http://127.0.0.1:{ports['mlflow']}")
        return self.state()

    def _register_webhook(self, receiver_env: dict[str, str]) -> None:
        """Create or update MLflow's registry webhook pointing at the receiver (idempotent)."""
        url = self.receiver_url()
        result = subprocess.run([sys.executable, "-m", "oppen.mlflow_webhook_receiver", "register", "--url", url,
                                 "--name", WEBHOOK_NAME], env=receiver_env, cwd=PROJECT_DIR, capture_output=True,
                                text=True)
        if result.returncode != 0:  # the receiver's messages never hold the secret
            raise SystemExit(f"registering the MLflow webhook failed: {result.stderr.strip()[-2000:]}")
        print(f"MLflow webhook {WEBHOOK_NAME!r} -> {url}: {result.stdout.strip()}")

    def _apply_automations(self, env: dict[str, str]) -> None:
        result = subprocess.run([sys.executable, "-m", "oppen.automations", "apply", "--json"], env=env,
                                cwd=PROJECT_DIR, capture_output=True, text=True)
        if result.returncode != 0:  # the command scrubs Slack's credentials from its errors
            raise SystemExit(f"applying automations.yaml failed: {result.stderr.strip()[-2000:]}")
        changes = json.loads(result.stdout)
        counts = {action: sum(change["action"] == action for change in changes)
                  for action in ("created", "updated", "unchanged", "deleted", "skipped")}
        summary = ", ".join(f"{count} {action}" for action, count in counts.items() if count) or "nothing to do"
        slack_off = any(change["action"] == "skipped" and "Slack" in change["detail"] for change in changes)
        print(f"applied automations.yaml: {summary}" + (" (Slack not configured: Slack-only ones skipped)"
                                                         if slack_off else ""))

    def _stop(self, names, quiet: bool = False) -> None:
        """SIGTERM each service's process group, wait for the groups to empty (15 s), then SIGKILL."""
        pids = {name: pid for name, pid in self.state().get("pids", {}).items() if name in names}
        for name, pid in pids.items():
            try:
                os.killpg(pid, signal.SIGTERM)
                if not quiet:
                    print(f"stopped {name} (pid {pid})")
            except OSError:
                pass
        deadline = time.monotonic() + 15
        for pid in pids.values():
            killed_at = None
            while group_alive(pid):
                now = time.monotonic()
                if killed_at is None and now > deadline:
                    killed_at = now
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
                elif killed_at is not None and now > killed_at + 10:
                    break  # SIGKILL cannot be ignored: what is left is the kernel's to clean up
                _reap(pid)
                time.sleep(0.2)
        state = self.state()
        if state:
            state["pids"] = {name: pid for name, pid in state.get("pids", {}).items() if name not in names}
            self._save(state)

    def down(self, quiet: bool = False) -> None:
        self._stop(list(self.state().get("pids", {})), quiet)

    def status(self) -> None:
        state = self.state()
        for name in SERVICES:
            print(f"{name}: {'running' if self._alive(name) else 'stopped'}")
        if state.get("ports"):
            print(f"Prefect UI: http://127.0.0.1:{state['ports']['prefect']}  "
                  f"MLflow UI: http://127.0.0.1:{state['ports']['mlflow']}")
            if "receiver" in state["ports"]:
                print(f"MLflow webhook receiver: {self.receiver_url()}")

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Point this process's Prefect and Oppen clients at the stack (the demo's own calls).

        Prefect reads its settings once per process, so its API URL is set as a temporary setting;
        Oppen's settings are read from the environment on each call.
        """
        from prefect.settings import PREFECT_API_URL, temporary_settings

        env = self.env()
        os.environ.update({k: v for k, v in env.items() if k.startswith("OPPEN_")})
        with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
            yield


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The embedded Oppen stack on this machine.")
    parser.add_argument("command", choices=["up", "demo", "status", "down", "env"])
    parser.add_argument("--param", "-p", action="append", default=[], help="key=value for the demo deployment run")
    args = parser.parse_args(argv)
    stack = LocalStack(load_settings().home)
    if args.command == "up":
        stack.up()
    elif args.command == "down":
        stack.down()
    elif args.command == "status":
        stack.status()
    elif args.command == "env":
        env = stack.env()
        for key in ("PREFECT_API_URL", "OPPEN_HOME", "OPPEN_MLFLOW_TRACKING_URI", "OPPEN_PROJECT_DIR"):
            print(f"export {key}={env[key]}")
        print(f"export MLFLOW_TRACKING_URI={env['OPPEN_MLFLOW_TRACKING_URI']}")
    else:
        from oppen.terminal.watch import parse_params, run_and_follow

        params = parse_params(args.param)
        stack.up()
        with stack.use():
            code = run_and_follow("train-mnist/local", params)
        raise SystemExit(code)


if __name__ == "__main__":
    main()
