"""The training callback of the run exporter: loss, validation, throughput and progress, read when scraped.

Inside the loop it only writes plain attributes (a few of them per step, no lock, no I/O): the loop
times its callbacks and the platform's budget inside it is 1% of training. The figures are turned
into Prometheus samples in the exporter's HTTP thread, when Prometheus asks (`collect`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from oppen.metrics.families import Families
from training.callbacks import Callback, LoopControl, RunInfo, StepInfo
from training.results import EpochRecord, TrainResult

# The loss of one batch is noisy; an exponential moving average over ~20 steps shows its trend and
# still follows a divergence within a few steps (alpha = 2 / (span + 1)).
LOSS_SPAN_STEPS = 20
# Throughput is measured over the latest 32 step ends: long enough to smooth one slow step, short enough
# to show a slowdown within seconds.
THROUGHPUT_WINDOW_STEPS = 32


class TrainingMetrics(Callback):
    """Keeps the latest training figures of one run; `collect` turns them into the `oppen_training_*` samples."""

    def __init__(self, expected_epoch_seconds: float | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.expected_epoch_seconds = expected_epoch_seconds  # from the request's speed history; None without
        self.clock = clock
        self.total_steps: int | None = None
        self.step: int | None = None
        self.epoch: int | None = None
        self.loss: float | None = None
        self.validation: dict[str, float] = {}
        self.last_epoch_seconds: float | None = None
        self.last_epoch_samples_per_second: float | None = None
        self._alpha = 2.0 / (LOSS_SPAN_STEPS + 1)
        self._timed_epoch: int | None = None  # the epoch whose clock runs, None between epochs
        self._epoch_started = 0.0
        self._samples = 0
        # (clock, samples so far) at recent step ends; the epoch's start is the first point.
        self._window: deque[tuple[float, int]] = deque(maxlen=THROUGHPUT_WINDOW_STEPS + 1)

    # --- the loop's hooks (cheap: they run inside the timed training loop) --------------------

    def on_train_start(self, info: RunInfo, control: LoopControl) -> None:
        self.total_steps = info.total_steps
        self.step = info.start_step
        self.epoch = min(info.start_step // info.steps_per_epoch + 1, info.epochs)
        self._timed_epoch = None

    def on_step_begin(self, step: StepInfo, control: LoopControl) -> None:
        if step.epoch != self._timed_epoch:  # the first step of an epoch (or of a resumed one)
            self._timed_epoch = step.epoch
            self._epoch_started = self.clock()
            self._window.clear()  # the validation pass between epochs is not training throughput
            self._window.append((self._epoch_started, self._samples))

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        self.step, self.epoch = step.step, step.epoch
        self._samples += step.samples
        self._window.append((self.clock(), self._samples))
        if step.loss is not None:
            self.loss = step.loss if self.loss is None else self.loss + self._alpha * (step.loss - self.loss)

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        self.validation = dict(epoch.metrics)  # replaced whole: a scrape sees one epoch's figures, never a mix
        self.last_epoch_seconds = epoch.epoch_seconds
        self.last_epoch_samples_per_second = epoch.samples_per_second
        self._timed_epoch = None

    def on_train_end(self, result: TrainResult, control: LoopControl) -> None:
        self.step = result.steps
        self._timed_epoch = None

    # --- the scrape (the exporter's HTTP thread) ------------------------------------------------

    def samples_per_second(self) -> float | None:
        window = list(self._window)  # a copy: the loop appends while a scrape reads
        if len(window) >= 2 and window[-1][0] > window[0][0]:
            (started, first), (ended, last) = window[0], window[-1]
            return (last - first) / (ended - started)
        return self.last_epoch_samples_per_second

    def epoch_seconds(self) -> float | None:
        if self._timed_epoch is not None:
            return self.clock() - self._epoch_started
        return self.last_epoch_seconds

    def collect(self, families: Families, labels: dict[str, str]) -> None:
        gauges = {
            "oppen_training_loss": self.loss,
            "oppen_training_samples_per_second": self.samples_per_second(),
            "oppen_training_epoch": self.epoch,
            "oppen_training_step": self.step,
            "oppen_training_total_steps": self.total_steps,
            "oppen_training_epoch_seconds": self.epoch_seconds(),
            "oppen_training_expected_epoch_seconds": self.expected_epoch_seconds,
        }
        for name, value in gauges.items():
            if value is not None:
                families.add(name, value, **labels)
        for metric, value in self.validation.items():
            families.add("oppen_training_validation_metric", value, **labels, metric=metric)
