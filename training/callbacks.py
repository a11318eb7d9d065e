"""The callback interface of the training loop.

Logging, cost metering, forecasting and progress reporting plug in here from outside, so the
loop itself knows nothing about Prefect, MLflow or money.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.results import EpochRecord, TrainResult


@dataclass(frozen=True)
class RunInfo:
    """What callbacks learn when the run starts."""

    workload: str
    device: str
    total_steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    start_step: int  # > 0 when the run resumed from a checkpoint
    config: dict


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, as seen before it runs (loss is None) or after it."""

    step: int  # 1-based index of this step in the whole run
    epoch: int  # 1-based
    batch_in_epoch: int  # 1-based
    steps_per_epoch: int
    total_steps: int
    samples: int  # samples in this step's batch
    loss: float | None = None
    step_seconds: float | None = None


@dataclass
class LoopControl:
    """Lets a callback ask the loop to stop cleanly; the loop checkpoints and returns."""

    stop_reason: str | None = None
    notes: dict[str, object] = field(default_factory=dict)

    def request_stop(self, reason: str) -> None:
        # The first reason wins: later callbacks should not overwrite why the run stopped.
        if self.stop_reason is None:
            self.stop_reason = reason

    @property
    def should_stop(self) -> bool:
        return self.stop_reason is not None


class Callback:
    """Override any subset. Every hook gets the shared LoopControl to request a clean stop."""

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None: ...

    def on_step_begin(self, step: StepInfo, control: LoopControl) -> None:
        """Runs before the step; requesting a stop here means the step never runs (budget caps)."""

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None: ...

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None: ...

    def on_checkpoint(self, path: str, step: int, control: LoopControl) -> None: ...

    def on_train_end(self, result: TrainResult, control: LoopControl) -> None: ...


class CallbackList(Callback):
    """Fans each hook out to several callbacks in order, and times the hooks called inside the loop.

    `seconds` is what the callbacks took of the training loop (steps, epoch ends, checkpoints): the
    platform's overhead inside the loop, measured where it happens rather than inferred from two runs.
    """

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])
        self.seconds_by = {type(cb).__name__: 0.0 for cb in self.callbacks}

    @property
    def seconds(self) -> float:
        return sum(self.seconds_by.values())

    def _timed(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            started = time.perf_counter()
            try:
                getattr(cb, hook)(*args)
            finally:
                self.seconds_by[type(cb).__name__] += time.perf_counter() - started

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        for cb in self.callbacks:
            cb.on_train_start(info, control)

    def on_step_begin(self, step: StepInfo, control: LoopControl) -> None:
        self._timed("on_step_begin", step, control)

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        self._timed("on_step_end", step, control)

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        self._timed("on_epoch_end", epoch, control)

    def on_checkpoint(self, path: str, step: int, control: LoopControl) -> None:
        self._timed("on_checkpoint", path, step, control)

    def on_train_end(self, result: TrainResult, control: LoopControl) -> None:
        for cb in self.callbacks:
            cb.on_train_end(result, control)
