"""Hold one `gpu-slots` slot per GPU a run uses (the global limit in work_pools/pools.yaml).

Pool and queue limits count flow runs; this counts GPUs, so an 8-GPU run and eight 1-GPU runs
weigh the same. Slots are leased: a pod that dies without releasing them frees them when its
lease runs out. Billing starts when the slots are held (`acquired_at`): time spent waiting for
GPUs is neither charged nor counted in the speed history.
"""

from __future__ import annotations

import contextlib
import time

from prefect import get_run_logger
from prefect.concurrency.sync import concurrency

GPU_SLOTS_LIMIT = "gpu-slots"


class GpuSlots:
    """`with GpuSlots(n) as slots:` holds n slots until `release()` or the end of the block, whichever is first."""

    def __init__(self, gpus: int, timeout_seconds: float | None = None) -> None:
        self.gpus = gpus
        self.timeout_seconds = timeout_seconds
        self.acquired_at: float | None = None  # time.monotonic() when the slots were held
        self._held = contextlib.ExitStack()

    def __enter__(self) -> GpuSlots:
        if self.gpus > 0:
            logger = get_run_logger()
            logger.info("waiting for %d %s slot(s)", self.gpus, GPU_SLOTS_LIMIT)
            # strict=False: a server without the limit (the embedded default before `work_pools.apply`)
            # runs unthrottled rather than refusing every GPU run.
            self._held.enter_context(concurrency(GPU_SLOTS_LIMIT, occupy=self.gpus,
                                                 timeout_seconds=self.timeout_seconds, strict=False))
            logger.info("holding %d %s slot(s)", self.gpus, GPU_SLOTS_LIMIT)
        self.acquired_at = time.monotonic()
        return self

    def release(self) -> None:
        """The GPUs are free once the model is saved; idempotent."""
        self._held.close()

    def __exit__(self, *exc_info) -> None:
        self.release()
