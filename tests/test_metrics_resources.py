"""Resource figures: the whole process tree's CPU and memory, the run's GPUs, what it asked for."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from oppen.cost.price_book import Resources
from oppen.metrics.families import Families
from oppen.metrics.gpu import GpuReader, GpuReading, visible_devices
from oppen.metrics.process_tree import GIB, ProcessTree, memory_limit_bytes
from oppen.metrics.resource_sampler import ResourceSampler

# /proc counts CPU time in clock ticks; user and system time may each lose up to one to truncation.
TICKS_LOST = 2 / os.sysconf("SC_CLK_TCK")
LABELS = {"flow_run_id": "r1", "workload": "mnist", "experiment": "mnist", "team": "vision"}

# Burns CPU until it has used 0.3 s of it, says how much, then waits (alive) until its stdin closes.
BURNER = """
import sys, time
while time.process_time() < 0.3:
    pass
print(time.process_time(), flush=True)
sys.stdin.read()
"""


class SteppedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_childs_cpu_and_memory_count_as_the_runs():
    clock = SteppedClock()
    tree = ProcessTree(clock=clock)
    assert tree.sample().cpu_percent is None  # one sample cannot say how busy the interval was
    child = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        burned = float(child.stdout.readline())
        child_rss = psutil.Process(child.pid).memory_info().rss
        clock.now += 1.0
        usage = tree.sample()
    finally:
        child.stdin.close()
        child.wait()
    # Over one (stepped) second the tree used at least the child's CPU seconds: 100% = one core.
    assert usage.cpu_percent >= 100 * (burned - TICKS_LOST)
    assert usage.rss_bytes >= child_rss + psutil.Process().memory_info().rss // 2


def test_a_child_that_ended_and_was_reaped_is_still_counted():
    clock = SteppedClock()
    tree = ProcessTree(clock=clock)
    tree.sample()
    child = subprocess.Popen([sys.executable, "-c", BURNER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    burned = float(child.stdout.readline())
    child.stdin.close()
    child.wait()  # reaped: its seconds are now in this process's children times
    clock.now += 1.0
    assert tree.sample().cpu_percent >= 100 * (burned - TICKS_LOST)


def test_memory_limit_is_the_request_else_at_most_the_machine():
    assert memory_limit_bytes(4) == 4 * GIB
    assert 0 < memory_limit_bytes(0) <= psutil.virtual_memory().total


@pytest.mark.parametrize("spec, count, devices, expected", [
    (None, 2, 4, [0, 1]),  # nothing set: the first devices, as torch's `cuda` takes device 0 first
    (None, 2, 1, [0]),
    ("2,3", 2, 4, [2, 3]),
    ("3,1,0", 2, 4, [3, 1]),  # the run's count of them, in CUDA's order
    ("GPU-8a1b,GPU-9c2d", 1, 2, ["GPU-8a1b"]),
    ("1,7,0", 3, 4, [1]),  # CUDA stops at the first invalid entry (7 does not exist)
    ("", 1, 4, []),  # set but empty: CUDA sees no device
    ("-1", 1, 4, []),
])
def test_the_runs_gpus_are_those_cuda_lets_it_see(spec, count, devices, expected):
    assert visible_devices(spec, count, devices) == expected


def test_a_cpu_run_opens_no_gpu_reader():
    assert GpuReader.open(0) is None


def collected(sampler: ResourceSampler) -> dict[str, float]:
    families = Families()
    sampler.collect(families, LABELS)
    return {family.name: family.samples[0].value for family in families}


def test_the_sampler_serves_the_request_always_and_usage_once_sampled():
    sampler = ResourceSampler(Resources(cpu_cores=1.5, memory_gib=2), every_s=60)
    assert collected(sampler) == {"oppen_run_cpu_cores_requested": 1.5, "oppen_run_gpus": 0,
                                  "oppen_run_memory_limit_bytes": 2 * GIB}
    sampler.start()
    try:
        figures = collected(sampler)
        assert figures["oppen_run_memory_bytes"] > 0 and "oppen_run_cpu_percent" not in figures
        sampler.sample()
        assert "oppen_run_cpu_percent" in collected(sampler)
        assert "oppen_run_gpu_utilization_percent" not in collected(sampler)  # a CPU run
    finally:
        sampler.stop()
    assert not sampler._thread.is_alive()


class OneGpu:
    """Stands in for NVML, which this machine does not have: the sampler's side of the GPU figures."""

    closed = False

    def read(self) -> GpuReading:
        return GpuReading(utilization_percent=37.5, memory_used_bytes=3 * GIB)

    def close(self) -> None:
        self.closed = True


def test_gpu_figures_come_from_the_reader_and_it_is_closed_at_stop():
    reader = OneGpu()
    sampler = ResourceSampler(Resources(gpus=1, gpu_type="NVIDIA-L4"), every_s=60, open_gpus=lambda count: reader)
    sampler.start()
    figures = collected(sampler)
    sampler.stop()
    assert figures["oppen_run_gpus"] == 1 and figures["oppen_run_gpu_utilization_percent"] == 37.5
    assert figures["oppen_run_gpu_memory_bytes"] == 3 * GIB and reader.closed
