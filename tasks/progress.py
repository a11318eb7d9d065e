"""Progress visible while training: the training's opening log line and a Prefect progress artifact.

Each epoch's line is the run's story (tasks/run_story.py), which also has its cost.
"""

from __future__ import annotations

import contextvars
import logging
import threading

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from training.callbacks import Callback, LoopControl, RunInfo, StepInfo
from training.results import EpochRecord


class PrefectProgressCallback(Callback):
    """Logs the training's plan through the task's run logger and moves a progress artifact along.

    The artifact is updated by a background thread at most every `min_interval_s` seconds with the
    latest progress: each update is an API call (20-40 ms here), which the training loop must not wait for.
    """

    def __init__(self, logger: logging.Logger | logging.LoggerAdapter, key: str, min_interval_s: float = 5.0) -> None:
        self.logger, self.key, self.min_interval_s = logger, key, min_interval_s
        self.artifact_id = None
        self._latest: float | None = None
        self._sent: float | None = None
        self._wake = threading.Event()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        self.total = info.total_steps
        start = 100.0 * info.start_step / max(info.total_steps, 1)
        self.artifact_id = create_progress_artifact(
            progress=start, key=self.key, description=f"{info.workload}: {info.total_steps} steps on {info.device}"
        )
        # The sender runs in this task's context (Prefect's client and settings live in context variables).
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._send_loop,),
                                        name="progress-artifact", daemon=True)
        self._thread.start()
        resumed = f", resuming at step {info.start_step}" if info.start_step else ""
        self.logger.info(
            "training %s on %s: %d epochs x %d steps (batch %d, %d steps in all%s)",
            info.workload, info.device, info.epochs, info.steps_per_epoch, info.batch_size, info.total_steps, resumed,
        )

    def _update(self, step: int, force: bool = False) -> None:
        self._latest = 100.0 * step / max(self.total, 1)
        if force:
            self._wake.set()

    def _send_loop(self) -> None:
        while not self._done.is_set():
            self._wake.wait(self.min_interval_s)
            self._wake.clear()
            self._send()
        self._send()

    def _send(self) -> None:
        latest = self._latest
        if self.artifact_id is None or latest is None or latest == self._sent:
            return
        try:
            update_progress_artifact(self.artifact_id, progress=latest)
            self._sent = latest
        except Exception as error:  # the API briefly unreachable: the next update carries the latest figure
            self.logger.debug("progress artifact not updated: %s", error)

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        self._update(step.step)

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        self._update(epoch.step, force=True)

    def on_train_end(self, result, control: LoopControl) -> None:
        self._update(result.steps)
        self.close()

    def close(self) -> None:
        """Send the last figure and stop the sender; idempotent (the task calls it on every exit)."""
        self._done.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10.0)
            self._thread = None
