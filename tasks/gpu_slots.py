"""Hold one `gpu-slots` slot per GPU a run uses (the global limit in work_pools/pools.yaml).

Pool and queue limits count flow runs; this counts GPUs, so an 8-GPU run and eight 1-GPU runs
weigh the same. Slots are leased: a pod that dies without releasing them frees them when its
lease runs out.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.concurrency.sync import concurrency

GPU_SLOTS_LIMIT = "gpu-slots"


@contextmanager
def hold_gpu_slots(gpus: int, timeout_seconds: float | None = None) -> Iterator[None]:
    if gpus <= 0:
        yield
        return
    get_run_logger().info("waiting for %d %s slot(s)", gpus, GPU_SLOTS_LIMIT)
    # strict=False: a server without the limit (the embedded default before `work_pools.apply`)
    # runs unthrottled rather than refusing every GPU run.
    with concurrency(GPU_SLOTS_LIMIT, occupy=gpus, timeout_seconds=timeout_seconds, strict=False):
        get_run_logger().info("holding %d %s slot(s)", gpus, GPU_SLOTS_LIMIT)
        yield
