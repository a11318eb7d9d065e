"""What a run uses against what it asked for, sampled on a background thread every few seconds.

Never from the training loop: a sample walks the process tree (/proc) and may ask NVML, about a
millisecond or two, which per step would be measurable and which a scrape should not wait for either.
A scrape reads the latest sample; what the run requested is fixed and always served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from oppen.cost.price_book import Resources
from oppen.metrics.families import Families
from oppen.metrics.gpu import GpuReader, GpuReading
from oppen.metrics.process_tree import ProcessTree, TreeUsage, memory_limit_bytes

log = logging.getLogger("oppen.metrics")

# Prometheus scrapes every 15-30 s; a sample every 5 s keeps the CPU figure to the latest seconds at
# about 0.05% of a core.
SAMPLE_EVERY_S = 5.0


class ResourceSampler:
    """Samples the run's process tree and GPUs on its own daemon thread between `start` and `stop`."""

    def __init__(self, resources: Resources, every_s: float = SAMPLE_EVERY_S,
                 open_gpus: Callable[[int], GpuReader | None] = GpuReader.open) -> None:
        self.resources = resources
        self.every_s = every_s
        self.tree = ProcessTree()  # this process: the flow run's, with its data-loader workers
        self._open_gpus = open_gpus
        self.gpus: GpuReader | None = None
        self.usage: TreeUsage | None = None
        self.gpu: GpuReading | None = None
        self.memory_limit = memory_limit_bytes(resources.memory_gib)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self.gpus = self._open_gpus(self.resources.gpus)
        self.sample()  # memory is known from the first scrape on; CPU needs a second sample
        self._thread = threading.Thread(target=self._run, name="oppen-resource-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.gpus is not None:
            self.gpus.close()
            self.gpus = None

    def sample(self) -> None:
        try:
            self.usage = self.tree.sample()
            self.gpu = self.gpus.read() if self.gpus is not None else None
        except Exception:  # noqa: BLE001 - a monitoring fault must never reach training; said once, not per sample
            if not self._failing:
                log.warning("sampling the run's resources failed; its resource metrics may be stale", exc_info=True)
            self._failing = True
        else:
            self._failing = False

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.sample()

    def collect(self, families: Families, labels: dict[str, str]) -> None:
        families.add("oppen_run_cpu_cores_requested", self.resources.cpu_cores, **labels)
        families.add("oppen_run_gpus", self.resources.gpus, **labels)
        families.add("oppen_run_memory_limit_bytes", self.memory_limit, **labels)
        usage, gpu = self.usage, self.gpu  # one sample's figures, even if the thread replaces them meanwhile
        if usage is not None:
            families.add("oppen_run_memory_bytes", usage.rss_bytes, **labels)
            if usage.cpu_percent is not None:
                families.add("oppen_run_cpu_percent", usage.cpu_percent, **labels)
        if gpu is not None:
            families.add("oppen_run_gpu_utilization_percent", gpu.utilization_percent, **labels)
            families.add("oppen_run_gpu_memory_bytes", gpu.memory_used_bytes, **labels)
