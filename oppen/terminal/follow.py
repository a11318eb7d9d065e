"""Follow a flow run from the terminal: its state changes and its story lines, as they reach Prefect.

The lines are the run's own logs on the story logger (oppen/story.py), read back from Prefect's
logs API: what the terminal shows is what the Prefect UI keeps, never a second channel, and the
event feed's dozens of task-run transitions stay out of it. While the run is queued or between
lines, a rich spinner on stderr says what it is waiting for (only on a terminal).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTimestamp
from prefect.client.schemas.objects import FlowRun, Log
from prefect.client.schemas.sorting import LogSort
from rich.console import Console

from oppen.story import STORY_LOGGER

POLL_SECONDS = 1.0
# Prefect's log handler ships a run's lines every couple of seconds and at the process's exit, so the
# last ones can land after the final state: keep reading this long after it.
DRAIN_SECONDS = 4.0
LOG_PAGE = 200
WARNING = 30


def story_lines(logs: list[Log]) -> list[Log]:
    return [log for log in logs if log.name == STORY_LOGGER]


def format_line(log: Log) -> str:
    mark = "!" if log.level >= WARNING else "·"
    return f"{log.timestamp:%H:%M:%S} {mark} {log.message}"


class RunFollower:
    """Reads one flow run's state and new story lines on each poll; `follow` loops until it ends."""

    def __init__(self, client: SyncPrefectClient, flow_run_id: str, write: Callable[[str], None]) -> None:
        self.client, self.flow_run_id, self.write = client, UUID(flow_run_id), write
        self.seen: set[UUID] = set()
        self.after = None
        self.state_name: str | None = None

    def poll(self) -> FlowRun:
        """The run now; prints its new lines, then its state if that changed (a final one is left to `follow`)."""
        flow_run = self.client.read_flow_run(self.flow_run_id)
        self._new_lines()
        name = flow_run.state.name if flow_run.state else None
        if name != self.state_name and not (flow_run.state and flow_run.state.is_final()):
            self._state_line(name)
        return flow_run

    def _state_line(self, name: str | None) -> None:
        self.state_name = name
        self.write(f"{time.strftime('%H:%M:%S')} ▸ {name}")

    def _new_lines(self) -> None:
        while True:
            timestamps = LogFilterTimestamp(after_=self.after) if self.after else None
            logs = self.client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[self.flow_run_id]), timestamp=timestamps),
                limit=LOG_PAGE, sort=LogSort.TIMESTAMP_ASC)
            fresh = [log for log in logs if log.id not in self.seen]
            for log in fresh:
                self.seen.add(log.id)
            for log in story_lines(fresh):
                self.write(format_line(log))
            if logs:
                self.after = logs[-1].timestamp  # `after_` is inclusive: the ids above drop what was shown
            if len(logs) < LOG_PAGE:
                return

    def follow(self, status=None, poll_seconds: float = POLL_SECONDS, timeout: float | None = None) -> FlowRun:
        """Until the run is final (and its last lines have arrived), or `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            flow_run = self.poll()
            if status is not None:
                status.update(f"flow run {flow_run.name}: {flow_run.state.name if flow_run.state else '…'}")
            if flow_run.state and flow_run.state.is_final():
                break
            if deadline is not None and time.monotonic() > deadline:
                return flow_run
            time.sleep(poll_seconds)
        self.finish(flow_run, poll_seconds)
        return flow_run

    def finish(self, flow_run: FlowRun, poll_seconds: float = POLL_SECONDS) -> None:
        """Once the run is final: the lines still on their way, then its final state."""
        drain_until = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < drain_until:
            time.sleep(poll_seconds)
            self._new_lines()
        self._state_line(flow_run.state.name if flow_run.state else None)  # last: what led to it comes first


def follow_run(client: SyncPrefectClient, flow_run_id: str, console: Console | None = None,
               timeout: float | None = None) -> FlowRun:
    """Print a run's story as it happens; a spinner on stderr while waiting, when stderr is a terminal."""
    out = console or Console(highlight=False, soft_wrap=True)
    errors = Console(stderr=True)
    follower = RunFollower(client, flow_run_id,
                           lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True))
    if not errors.is_terminal:
        return follower.follow(timeout=timeout)
    with errors.status("waiting for the flow run…") as status:
        return follower.follow(status=status, timeout=timeout)
