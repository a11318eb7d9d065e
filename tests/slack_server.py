"""A local HTTP server that acts as Slack: the Web API under /api/<method>, incoming webhooks under /services/.

It records every request (method, path, headers, parsed body, arrival time) and answers as scripted:
a queue of per-request behaviours, then a default one. A hanging answer waits until released (or its
time is up) and then closes the connection without a response; leaving the `with` block releases
every hanging handler, so none outlives the test.

    with FakeSlack() as slack:
        slack.script(rate_limited(1), OK)
        ...  # point WebClient(base_url=slack.api_url) or WebhookClient(slack.webhook_url) at it
        slack.wait_for_requests(2, timeout=5)
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl


@dataclass(frozen=True)
class Behaviour:
    kind: Literal["ok", "error", "rate_limited", "hang", "invalid_auth"]
    status: int = 200
    retry_after: float | None = None
    hang_s: float = 30.0


OK = Behaviour("ok")
INVALID_AUTH = Behaviour("invalid_auth")


def server_error(status: int = 500) -> Behaviour:
    return Behaviour("error", status=status)


def rate_limited(retry_after: float) -> Behaviour:
    return Behaviour("rate_limited", status=429, retry_after=retry_after)


def hang(seconds: float = 30.0) -> Behaviour:
    return Behaviour("hang", hang_s=seconds)


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # JSON as parsed, a form as a dict, else the text
    at: float  # time.monotonic() on arrival
    behaviour: Behaviour


class FakeSlack:
    def __init__(self, default: Behaviour = OK) -> None:
        self.default = default
        self._script: deque[Behaviour] = deque()
        self._requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._released = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---

    def __enter__(self) -> FakeSlack:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True  # a handler still hanging never holds up shutdown or the test process
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-slack", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    @property
    def port(self) -> int:
        assert self._server is not None, "use FakeSlack as a context manager"
        return self._server.server_address[1]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    @property
    def webhook_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/services/T000/B000/XXXX"

    # --- script and records ---

    def script(self, *behaviours: Behaviour) -> None:
        """The answers to the next requests, in order; then the default."""
        with self._lock:
            self._script.extend(behaviours)

    def release(self) -> None:
        """Ends every hang (now and later): the connection is closed without an answer."""
        self._released.set()

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    def wait_for_requests(self, n: int, timeout: float) -> list[Recorded]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self._requests) >= n, timeout):
                raise TimeoutError(f"{len(self._requests)} request(s) reached the fake Slack, expected {n}")
            return list(self._requests)

    def messages(self) -> list[dict]:
        """The JSON bodies of the posts that were answered ok."""
        return [r.body for r in self.requests if r.behaviour.kind == "ok" and isinstance(r.body, dict)]

    def _record(self, recorded: Recorded) -> None:
        with self._arrived:
            self._requests.append(recorded)
            self._arrived.notify_all()

    def _behaviour(self) -> Behaviour:
        with self._lock:
            return self._script.popleft() if self._script else self.default


def _handler_for(slack: FakeSlack) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8")
            behaviour, body = slack._behaviour(), _parse(self.headers, raw)
            headers = dict(self.headers.items())
            slack._record(Recorded(self.command, self.path, headers, body, time.monotonic(), behaviour))
            webhook = self.path.startswith("/services/")
            if behaviour.kind == "hang":
                slack._released.wait(behaviour.hang_s)
                self.close_connection = True  # no answer at all
                return
            if behaviour.kind == "error":
                self._answer(behaviour.status, "text/html", "<html>internal error</html>")
            elif behaviour.kind == "rate_limited":
                answer = "rate_limited" if webhook else json.dumps({"ok": False, "error": "ratelimited"})
                self._answer(429, "text/plain" if webhook else "application/json", answer,
                             {"Retry-After": f"{behaviour.retry_after:g}"})
            elif behaviour.kind == "invalid_auth":
                if webhook:  # what Slack answers a revoked webhook
                    self._answer(403, "text/plain", "invalid_token")
                else:  # the Web API answers 200 with ok: false
                    self._answer(200, "application/json", json.dumps({"ok": False, "error": "invalid_auth"}))
            elif webhook:
                self._answer(200, "text/html", "ok")
            else:
                self._answer(200, "application/json", json.dumps(_api_answer(self.path, body)))

        do_GET = do_POST

        def _answer(self, status: int, content_type: str, body: str, headers: dict[str, str] | None = None) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", f"{content_type}; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the records are the log; stderr stays readable

    return Handler


def _parse(headers, raw: str) -> Any:
    content_type = headers.get("Content-Type", "")
    if "json" in content_type:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    if "x-www-form-urlencoded" in content_type:
        return dict(parse_qsl(raw))
    return raw


def _api_answer(path: str, body: Any) -> dict[str, Any]:
    method = path.removeprefix("/api/").split("?")[0]
    if method == "auth.test":
        return {"ok": True, "url": "https://oppen-test.slack.com/", "team": "Oppen", "user": "oppen-bot",
                "team_id": "T000", "user_id": "U000", "bot_id": "B000"}
    if method == "chat.postMessage":
        channel = body.get("channel") if isinstance(body, dict) else None
        return {"ok": True, "channel": channel, "ts": f"{time.time():.6f}", "message": {"type": "message"}}
    return {"ok": True}
