"""The training callback: what each `oppen_training_*` series says at each point of a run (a stepped clock)."""

from __future__ import annotations

import pytest

from oppen.metrics.families import Families
from oppen.metrics.training_metrics import LOSS_SPAN_STEPS, TrainingMetrics
from training.callbacks import LoopControl, RunInfo, StepInfo
from training.results import EpochRecord

LABELS = {"flow_run_id": "r1", "workload": "mnist", "experiment": "mnist", "team": "vision"}
CONTROL = LoopControl()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def collected(metrics: TrainingMetrics) -> dict[tuple[str, str | None], float]:
    families = Families()
    metrics.collect(families, LABELS)
    return {(family.name, sample.labels.get("metric")): sample.value for family in families for sample in family.samples}


def step(metrics: TrainingMetrics, clock: Clock, number: int, epoch: int, loss: float, seconds: float = 0.5,
         per_epoch: int = 4, samples: int = 64) -> None:
    shape = (number, epoch, (number - 1) % per_epoch + 1, per_epoch, 8)
    metrics.on_step_begin(StepInfo(*shape, samples), CONTROL)
    clock.now += seconds
    metrics.on_step_end(StepInfo(*shape, samples, loss, seconds), CONTROL)


def test_before_the_first_step_only_the_plan_is_served():
    metrics = TrainingMetrics(expected_epoch_seconds=3.0, clock=Clock())
    assert collected(metrics) == {("oppen_training_expected_epoch_seconds", None): 3.0}
    metrics.on_train_start(RunInfo("mnist", "cpu", 8, 4, 2, 64, 0, {}), CONTROL)
    assert collected(metrics) == {("oppen_training_expected_epoch_seconds", None): 3.0,
                                  ("oppen_training_epoch", None): 1, ("oppen_training_step", None): 0,
                                  ("oppen_training_total_steps", None): 8}


def test_a_run_through_two_epochs():
    clock = Clock()
    metrics = TrainingMetrics(clock=clock)
    metrics.on_train_start(RunInfo("mnist", "cpu", 8, 4, 2, 64, 0, {}), CONTROL)
    step(metrics, clock, 1, 1, loss=2.0)
    figures = collected(metrics)
    assert figures[("oppen_training_loss", None)] == 2.0  # the first loss starts the average
    assert figures[("oppen_training_samples_per_second", None)] == pytest.approx(64 / 0.5)
    assert figures[("oppen_training_epoch_seconds", None)] == pytest.approx(0.5)
    assert ("oppen_training_expected_epoch_seconds", None) not in figures  # no history, no series

    step(metrics, clock, 2, 1, loss=1.0, seconds=1.5)
    alpha = 2 / (LOSS_SPAN_STEPS + 1)
    assert collected(metrics)[("oppen_training_loss", None)] == pytest.approx(2.0 + alpha * (1.0 - 2.0))
    assert collected(metrics)[("oppen_training_samples_per_second", None)] == pytest.approx(128 / 2.0)
    clock.now += 3.0  # a slow moment: the epoch's clock runs on between steps, as a stall would show
    assert collected(metrics)[("oppen_training_epoch_seconds", None)] == pytest.approx(5.0)

    step(metrics, clock, 3, 1, loss=1.0)
    step(metrics, clock, 4, 1, loss=1.0)
    metrics.on_epoch_end(EpochRecord(epoch=1, step=4, train_loss=1.2, metrics={"val_accuracy": 0.9, "val_loss": 0.3},
                                     epoch_seconds=6.0, samples_per_second=42.0), CONTROL)
    clock.now += 10.0  # validation and checkpoint: the last epoch's time stays, not a growing one
    figures = collected(metrics)
    assert figures[("oppen_training_epoch_seconds", None)] == 6.0
    assert figures[("oppen_training_validation_metric", "val_accuracy")] == 0.9
    assert figures[("oppen_training_validation_metric", "val_loss")] == 0.3

    step(metrics, clock, 5, 2, loss=0.5, seconds=0.25)
    figures = collected(metrics)
    assert figures[("oppen_training_epoch", None)] == 2 and figures[("oppen_training_step", None)] == 5
    # Epoch 2's own clock and throughput: the 10 s between the epochs count in neither.
    assert figures[("oppen_training_epoch_seconds", None)] == pytest.approx(0.25)
    assert figures[("oppen_training_samples_per_second", None)] == pytest.approx(64 / 0.25)
    metrics.on_epoch_end(EpochRecord(epoch=2, step=8, train_loss=0.4, metrics={"val_accuracy": 0.95},
                                     epoch_seconds=2.0, samples_per_second=128.0), CONTROL)
    figures = collected(metrics)
    # One epoch's figures at a time, never a mix of two.
    assert [key for key in figures if key[0] == "oppen_training_validation_metric"] == [
        ("oppen_training_validation_metric", "val_accuracy")]


def test_throughput_is_over_the_latest_steps_only():
    clock = Clock()
    metrics = TrainingMetrics(clock=clock)
    metrics.on_train_start(RunInfo("mnist", "cpu", 200, 100, 2, 64, 0, {}), CONTROL)
    for number in range(1, 51):
        step(metrics, clock, number, 1, loss=1.0, seconds=2.0, per_epoch=100)  # slow steps first
    for number in range(51, 101):
        step(metrics, clock, number, 1, loss=1.0, seconds=0.5, per_epoch=100)
    assert collected(metrics)[("oppen_training_samples_per_second", None)] == pytest.approx(64 / 0.5)


def test_a_resumed_run_starts_at_its_checkpoint():
    metrics = TrainingMetrics(clock=Clock())
    metrics.on_train_start(RunInfo("mnist", "cpu", 8, 4, 2, 64, 6, {}), CONTROL)
    figures = collected(metrics)
    assert figures[("oppen_training_step", None)] == 6 and figures[("oppen_training_epoch", None)] == 2
