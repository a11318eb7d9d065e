"""What a run really used: CPU cores and memory via psutil, GPU via torch.cuda (NVML) where present.

Sampled from the training loop at most once per `every_seconds`, so it costs nothing measurable;
the recommender compares these against what the run requested (and paid for).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from oppen import tracking_keys as keys
from training.callbacks import Callback, LoopControl, RunInfo, StepInfo
from training.results import TrainResult

GIB = 1024**3


@dataclass(frozen=True)
class Utilization:
    cpu_cores_mean: float
    cpu_cores_peak: float
    memory_peak_gib: float
    gpu_util_mean: float | None  # 0..1, None without a GPU or NVML
    gpu_memory_peak_gib: float | None
    samples: int

    def as_metrics(self) -> dict[str, float]:
        metrics = {
            keys.CPU_CORES_MEAN: self.cpu_cores_mean,
            keys.CPU_CORES_PEAK: self.cpu_cores_peak,
            keys.MEMORY_PEAK_GIB: self.memory_peak_gib,
        }
        if self.gpu_util_mean is not None:
            metrics[keys.GPU_UTIL_MEAN] = self.gpu_util_mean
        if self.gpu_memory_peak_gib is not None:
            metrics[keys.GPU_MEMORY_PEAK_GIB] = self.gpu_memory_peak_gib
        return metrics


class UtilizationSampler(Callback):
    # Every 2 s, and the process's children (data-loader workers, a scan of /proc) every 5th sample: a
    # sample costs ~2 ms of the training thread, and a minute-long run still gets 30.
    CHILDREN_EVERY = 5

    def __init__(self, every_seconds: float = 2.0) -> None:
        self.every_seconds = every_seconds
        self.process = psutil.Process()
        self.cpu: list[float] = []
        self.gpu: list[float] = []
        self.memory_peak = 0
        self._last = 0.0
        self._cuda = False
        self.report: Utilization | None = None

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        self.process.cpu_percent(None)  # primes the counter: the next call measures from here
        self._last = time.monotonic()
        self._cuda = info.device.startswith("cuda")
        if self._cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        now = time.monotonic()
        if now - self._last < self.every_seconds:
            return
        self._last = now
        self.cpu.append(self.process.cpu_percent(None) / 100.0)  # cores busy since the last sample
        self.memory_peak = max(self.memory_peak, self._rss(children=len(self.cpu) % self.CHILDREN_EVERY == 1))
        if self._cuda:
            utilization = _gpu_utilization()
            if utilization is not None:
                self.gpu.append(utilization)

    def on_train_end(self, result: TrainResult, control: LoopControl) -> None:
        if not self.cpu:  # a run shorter than one sampling period
            self.cpu.append(self.process.cpu_percent(None) / 100.0)
        self.memory_peak = max(self.memory_peak, self._rss())
        gpu_memory = None
        if self._cuda:
            import torch

            gpu_memory = torch.cuda.max_memory_allocated() / GIB
        self.report = Utilization(
            cpu_cores_mean=sum(self.cpu) / len(self.cpu),
            cpu_cores_peak=max(self.cpu),
            memory_peak_gib=self.memory_peak / GIB,
            gpu_util_mean=(sum(self.gpu) / len(self.gpu)) if self.gpu else None,
            gpu_memory_peak_gib=gpu_memory,
            samples=len(self.cpu),
        )

    def _rss(self, children: bool = True) -> int:
        rss = self.process.memory_info().rss
        for child in self.process.children(recursive=True) if children else ():  # data-loader workers count too
            try:
                rss += child.memory_info().rss
            except psutil.Error:
                continue
        return rss


def _gpu_utilization() -> float | None:
    try:
        import torch

        return torch.cuda.utilization() / 100.0  # needs NVML (pynvml); absent on many installs
    except Exception:  # noqa: BLE001 - NVML missing or not permitted: utilisation is simply unknown
        return None
