"""CPU and resident memory of a process and all its descendants (data-loader workers, tokenizer pools).

CPU use is measured from CPU seconds, not from psutil's per-process percentages: each process's time
is counted once, as its own while it lives and in its parent's `children_*` times once reaped, so a
worker that starts or ends between two samples is still counted in full.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

GIB = 1024**3


@dataclass(frozen=True)
class TreeUsage:
    cpu_percent: float | None  # 100 = one core busy over the interval; None on the first sample
    rss_bytes: int


class ProcessTree:
    """Samples one process tree; each `sample` reports CPU use since the previous one."""

    def __init__(self, process: psutil.Process | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.process = process or psutil.Process()
        self.clock = clock
        self._last: tuple[float, float] | None = None  # (clock, CPU seconds of the tree)

    def sample(self) -> TreeUsage:
        cpu_seconds, rss = self._totals()
        now = self.clock()
        percent = None
        if self._last is not None and now > self._last[0]:
            # A child that exited but is not reaped yet takes its seconds out of the sum for a moment: never below 0.
            percent = max(0.0, 100.0 * (cpu_seconds - self._last[1]) / (now - self._last[0]))
        self._last = (now, cpu_seconds)
        return TreeUsage(percent, rss)

    def _totals(self) -> tuple[float, int]:
        cpu, rss = 0.0, 0
        for process in (self.process, *self._descendants()):
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu += times.user + times.system + times.children_user + times.children_system
                    rss += process.memory_info().rss
            except psutil.Error:  # it exited while we looked
                continue
        return cpu, rss

    def _descendants(self) -> list[psutil.Process]:
        try:
            return self.process.children(recursive=True)
        except psutil.Error:
            return []


def memory_limit_bytes(memory_gib: float) -> int:
    """The run's memory: its request when it made one, else its container's (cgroup) limit, else the machine's."""
    if memory_gib > 0:
        return int(memory_gib * GIB)
    machine = psutil.virtual_memory().total
    container = _cgroup_memory_limit()
    return min(machine, container) if container else machine


def _cgroup_memory_limit() -> int | None:
    """cgroup v2's memory.max of this process's cgroup (a pod's limit); None when unlimited or unreadable."""
    try:
        # "0::/kubepods/..." on cgroup v2; v1 lines carry controller names and are skipped.
        line = next(line for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
        value = (Path("/sys/fs/cgroup") / line[3:].lstrip("/") / "memory.max").read_text().strip()
    except (OSError, StopIteration):
        return None
    return int(value) if value.isdigit() else None  # "max": no limit
