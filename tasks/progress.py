"""Progress visible while training: per-epoch log lines and a Prefect progress artifact."""

from __future__ import annotations

import logging
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from training.callbacks import Callback, LoopControl, RunInfo, StepInfo
from training.results import EpochRecord


class PrefectProgressCallback(Callback):
    """Logs each epoch through the task's run logger and moves a progress artifact along.

    The artifact is updated at most every `min_interval_s` seconds: each update is an API call,
    and a per-step call would cost more than the steps of a small model.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, key: str, min_interval_s: float = 5.0) -> None:
        self.logger, self.key, self.min_interval_s = logger, key, min_interval_s
        self.artifact_id = None
        self._last_update = 0.0

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        self.total = info.total_steps
        start = 100.0 * info.start_step / max(info.total_steps, 1)
        self.artifact_id = create_progress_artifact(
            progress=start, key=self.key, description=f"{info.workload}: {info.total_steps} steps on {info.device}"
        )
        resumed = f", resuming at step {info.start_step}" if info.start_step else ""
        self.logger.info(
            "training %s on %s: %d epochs x %d steps (batch %d, %d steps in all%s)",
            info.workload, info.device, info.epochs, info.steps_per_epoch, info.batch_size, info.total_steps, resumed,
        )

    def _update(self, step: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.artifact_id is not None and (force or now - self._last_update >= self.min_interval_s):
            update_progress_artifact(self.artifact_id, progress=100.0 * step / max(self.total, 1))
            self._last_update = now

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        self._update(step.step)

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        metrics = " ".join(f"{key}={value:.4f}" for key, value in sorted(epoch.metrics.items()))
        self.logger.info(
            "epoch %d (step %d/%d): train_loss=%.4f %s %.1fs %.0f samples/s",
            epoch.epoch, epoch.step, self.total, epoch.train_loss, metrics, epoch.epoch_seconds, epoch.samples_per_second,
        )
        self._update(epoch.step, force=True)

    def on_train_end(self, result, control: LoopControl) -> None:
        self._update(result.steps, force=True)
        if result.stopped_early:
            self.logger.warning("training stopped early at step %d: %s", result.steps, result.stop_reason)
