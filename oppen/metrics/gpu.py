"""Utilisation and memory of the GPUs a run holds, read through NVML (nvidia-ml-py).

Which GPUs are the run's: those CUDA lets this process see. In a Kubernetes pod the device plugin
exposes only the pod's GPUs, so every device NVML lists there is the run's; on a shared machine
CUDA_VISIBLE_DEVICES names them (indices or UUIDs). Without it, the first `count` devices, as
torch's `cuda` device picks device 0 first.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("oppen.metrics")


def visible_devices(spec: str | None, count: int, device_count: int) -> list[int | str]:
    """The devices a run of `count` GPUs uses: indices, or UUIDs as CUDA_VISIBLE_DEVICES gives them.

    CUDA reads CUDA_VISIBLE_DEVICES up to its first invalid entry and ignores the rest; so does this.
    """
    if spec is None:
        return list(range(min(count, device_count)))
    devices: list[int | str] = []
    for entry in (part.strip() for part in spec.split(",")):
        if entry.isdigit() and int(entry) < device_count:
            devices.append(int(entry))
        elif entry.startswith(("GPU-", "MIG-")):
            devices.append(entry)
        else:
            break
    return devices[:count]


@dataclass(frozen=True)
class GpuReading:
    utilization_percent: float  # mean over the run's GPUs that report it
    memory_used_bytes: int  # summed over the run's GPUs


class GpuReader:
    """NVML handles of the run's GPUs, opened once; `close` shuts NVML down."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    @classmethod
    def open(cls, count: int) -> GpuReader | None:
        """A reader for the run's `count` GPUs, or None where NVML cannot be used (no driver, no GPU, a CPU run)."""
        if count <= 0:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as error:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, ...: no GPU figures
            log.info("GPU utilisation is not reported: NVML is not usable here (%s)", error)
            return None
        try:
            devices = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), count, pynvml.nvmlDeviceGetCount())
            handles = [pynvml.nvmlDeviceGetHandleByIndex(device) if isinstance(device, int)
                       else pynvml.nvmlDeviceGetHandleByUUID(device) for device in devices]
        except pynvml.NVMLError as error:
            log.warning("GPU utilisation is not reported: NVML could not open the run's GPUs (%s)", error)
            pynvml.nvmlShutdown()
            return None
        return cls(handles) if handles else None

    def read(self) -> GpuReading | None:
        import pynvml

        utilizations, memory = [], 0
        for handle in self.handles:
            try:
                utilizations.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                memory += pynvml.nvmlDeviceGetMemoryInfo(handle).used
            except pynvml.NVMLError:  # a MIG slice reports no utilisation; a GPU that fell off the bus neither
                continue
        if not utilizations:
            return None
        return GpuReading(sum(utilizations) / len(utilizations), memory)

    def close(self) -> None:
        import pynvml

        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
