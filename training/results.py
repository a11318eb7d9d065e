"""Typed results that every training run returns (nothing is only printed)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class EpochRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    epoch: int
    step: int
    train_loss: float
    metrics: dict[str, float]
    epoch_seconds: float
    samples_per_second: float


class TrainResult(BaseModel):
    """What the loop did: how far it got, why it stopped, and what it measured."""

    model_config = ConfigDict(frozen=True)

    workload: str
    device: str
    steps: int  # optimizer steps completed over the whole run, resumed ones included
    total_steps: int  # steps the config asked for
    samples_seen: int
    epochs_completed: int
    resumed_from_step: int  # 0 for a fresh run
    stopped_early: bool
    stop_reason: str | None
    train_seconds: float  # wall time of this process's part of the run
    samples_per_second: float
    final_train_loss: float
    history: list[EpochRecord]
    val_metrics: dict[str, float]
    checkpoint_path: str | None
    num_parameters: int
    callback_seconds: float = 0.0  # of train_seconds, spent in callbacks (metrics, metering, progress)
    callback_seconds_by: dict[str, float] = {}  # the same, per callback class


class EvalResult(BaseModel):
    """A held-out evaluation: the metric the registry threshold is checked against."""

    model_config = ConfigDict(frozen=True)

    split: str
    metrics: dict[str, float]
    primary_metric: str
    higher_is_better: bool
    samples: int
    seconds: float

    @property
    def primary_value(self) -> float:
        return self.metrics[self.primary_metric]
