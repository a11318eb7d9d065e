"""Deadline-aware retries for one Slack post: slack-sdk decides *what* is retried, these *whether there is time*.

slack-sdk's handlers accept connection errors, 429 and 500/503; mixed into ours, a retry whose wait (backoff,
or Slack's Retry-After) would end past the deadline is not made, and none is made once the caller has stopped
waiting. So a message is never re-sent after the deadline.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.builtin_interval_calculators import BackoffRetryIntervalCalculator
from slack_sdk.http_retry.handler import RetryHandler

if TYPE_CHECKING:  # a _Post's outcome is a Delivery; tasks/slack.py imports this module, so not at run time
    from tasks.slack import Delivery

MAX_RETRIES = 2  # per kind of failure: three attempts at most, all inside the deadline
# 0.25 s then 0.5 s, plus up to 1 s of jitter each: a 5xx or a dropped connection is retried well
# inside the default 10 s deadline.
BACKOFF = BackoffRetryIntervalCalculator(backoff_factor=0.25)


class _Post:
    """One message on its way: the clock, the attempts and the outcome, shared by the sending thread, its
    retry handlers and the caller waiting for it."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.started = time.monotonic()
        self.attempts = 1
        self.channel: str | None = None
        self.gave_up: str | None = None  # why a retry was not made
        self.abandoned = False
        self.outcome: Delivery | None = None
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.deadline_s - (time.monotonic() - self.started)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def finish(self, outcome: Delivery) -> None:
        with self.lock:
            if not self.abandoned:
                self.outcome = outcome

    def abandon(self) -> Delivery | None:
        """Stop waiting: no retry from now on; the outcome if it arrived meanwhile."""
        with self.lock:
            self.abandoned = True
            return self.outcome


class _WithinDeadline(RetryHandler):
    """Retries what the slack-sdk handler it is mixed into accepts, when the wait ends before the deadline."""

    post: _Post

    def can_retry(self, *, state, request, response=None, error=None) -> bool:
        if not super().can_retry(state=state, request=request, response=response, error=error):
            return False
        wait = self.wait_s(state, response)
        if self.post.abandoned:
            self.post.gave_up = "the caller stopped waiting"
            return False
        if wait is None or wait >= self.post.left():
            self.post.gave_up = self.why_not(wait)
            return False
        self._wait = wait
        return True

    def wait_s(self, state, response) -> float | None:
        return self.interval_calculator.calculate_sleep_duration(state.current_attempt)

    def why_not(self, wait: float | None) -> str:
        return f"a retry in {wait:.1f} s would pass the {self.post.deadline_s:g} s deadline"

    def prepare_for_next_attempt(self, *, state, request, response=None, error=None) -> None:
        # slack-sdk's own sleeps are replaced by the wait already checked against the deadline
        state.next_attempt_requested = True
        time.sleep(self._wait)
        state.increment_current_attempt()
        self.post.attempts += 1


class _ConnectionRetry(_WithinDeadline, ConnectionErrorRetryHandler):
    pass


class _ServerErrorRetry(_WithinDeadline, ServerErrorRetryHandler):
    pass


class _RateLimitRetry(_WithinDeadline, RateLimitErrorRetryHandler):
    def wait_s(self, state, response) -> float | None:
        """Slack's Retry-After, in seconds; None (no retry) when it is missing or not a number."""
        headers = response.headers if response is not None else {}
        for name, values in headers.items():
            if name.lower() == "retry-after":
                try:
                    return max(float(values[0] if isinstance(values, list) else values), 0.0)
                except ValueError:
                    return None
        return None

    def why_not(self, wait: float | None) -> str:
        if wait is None:
            return "Slack's 429 carried no usable Retry-After"
        return f"Retry-After {wait:g} s would pass the {self.post.deadline_s:g} s deadline"


def _retry_handlers(post: _Post) -> list[RetryHandler]:
    handlers: list[RetryHandler] = [
        _ConnectionRetry(max_retry_count=MAX_RETRIES, interval_calculator=BACKOFF),
        _RateLimitRetry(max_retry_count=MAX_RETRIES, interval_calculator=BACKOFF),
        _ServerErrorRetry(max_retry_count=MAX_RETRIES, interval_calculator=BACKOFF),
    ]
    for handler in handlers:
        handler.post = post
    return handlers
