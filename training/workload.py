"""What the generic loop needs from a workload (MNIST, the language model, or a user's own)."""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from training.config import RunConfig
from training.errors import TrainingRequestError


class Workload(abc.ABC):
    """A model plus its data, step and evaluation. Users bring their own training code by subclassing."""

    #: Name used in results, MLflow and the cost history ("mnist", "lm", ...).
    name: str
    #: The validation metric the loop reports per epoch, and whether more is better.
    primary_metric: str
    higher_is_better: bool

    @abc.abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """The workload's own config (architecture, data), stored in checkpoints and logged as params."""

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A fresh model; called after seeding so initial weights depend only on the seed."""

    @abc.abstractmethod
    def num_train_samples(self) -> int: ...

    @abc.abstractmethod
    def train_batches(
        self, generator: torch.Generator, batch_size: int, start_batch: int, device: torch.device
    ) -> Iterator[Any]:
        """One epoch of batches in an order drawn from `generator`, starting at `start_batch` (0-based)."""

    @abc.abstractmethod
    def train_step(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        """Forward pass and loss of one batch; returns (loss, number of samples)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """Metrics on a held-out split ("val" or "test"); must contain `primary_metric`."""

    def metric_baseline(self) -> float | None:
        """The primary metric of an untrained model, for lower-is-better metrics (cost per point gained)."""
        return None

    def check_run(self, run: RunConfig) -> None:
        """Refuse a run this loaded workload cannot do as asked (`TrainingRequestError`: retrying will not help)."""
        samples = self.num_train_samples()
        if run.batch_size > samples:
            # Otherwise an epoch would round up to one step of fewer samples than asked, and calibration
            # (which skips warm-up steps) would time nothing.
            raise TrainingRequestError(
                f"batch_size {run.batch_size} is larger than the training split ({samples} samples)"
            )

    def steps_per_epoch(self, batch_size: int) -> int:
        # The last partial batch is dropped: equal-sized steps keep per-step cost and timing honest.
        return max(1, self.num_train_samples() // batch_size)

    def make_optimizer(self, model: nn.Module, run: RunConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=run.learning_rate)

    def make_scheduler(
        self, optimizer: torch.optim.Optimizer, run: RunConfig, total_steps: int
    ) -> torch.optim.lr_scheduler.LRScheduler:
        # One-cycle: a short warm-up then annealing; converges in few epochs, which is what we pay for.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=run.learning_rate, total_steps=max(total_steps, 2), pct_start=0.15
        )
