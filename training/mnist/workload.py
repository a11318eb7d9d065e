"""MNIST as a Workload: config, batches, step and evaluation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from training.config import DataDir, FrozenConfig, RunConfig
from training.errors import TrainingRequestError
from training.mnist.data import FILES, MnistSplits, count_local, load_mnist, local_directory, split
from training.mnist.models import MnistModelName, build_mnist_model
from training.results import EvalResult
from training.workload import Workload

EVAL_BATCH = 2000  # evaluation has no backward pass, so big batches are cheap and fast


class MnistConfig(FrozenConfig):
    """The MNIST workload: which network, and where the data is."""

    model: MnistModelName = Field("default", description="'default' (fast CNN) or 'reference' (the seed's CNN).")
    data_dir: DataDir = Field(
        None, description="Directory with the four IDX .gz files; None: $OPPEN_MNIST_DIR, else download."
    )
    val_size: PositiveInt = Field(
        5000, le=59_999, description="Training images held out for validation (MNIST has 60,000; one must stay)."
    )


class MnistWorkload(Workload):
    name = "mnist"
    primary_metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, config: MnistConfig, splits: MnistSplits) -> None:
        self.config = config
        self.splits = splits

    @classmethod
    def load(cls, config: MnistConfig, seed: int = 0) -> MnistWorkload:
        return cls(config, split(load_mnist(config.data_dir), config.val_size, seed))

    @classmethod
    def check_request(cls, config: MnistConfig, run: RunConfig, data_dir: Path | None = None) -> None:
        """Refuse, before the expensive load, a request the local files cannot serve (reads only their headers).

        `data_dir` overrides `config.data_dir`; with neither and no $OPPEN_MNIST_DIR the data is downloaded
        at load time, so there is nothing local to check yet.
        """
        directory = local_directory(data_dir or config.data_dir)
        if directory is None:
            return
        n_train = count_local(directory)["train"]
        images = directory / FILES["train_images"]
        if config.val_size >= n_train:
            raise TrainingRequestError(
                f"val_size {config.val_size} leaves no training images: {images} holds {n_train}"
            )
        train_size = n_train - config.val_size
        if run.batch_size > train_size:
            raise TrainingRequestError(
                f"batch_size {run.batch_size} is larger than the training split ({train_size} samples: "
                f"{n_train} in {images} less val_size {config.val_size})"
            )

    def config_dict(self) -> dict[str, Any]:
        return {"model": self.config.model, "val_size": self.config.val_size}

    def build_model(self) -> nn.Module:
        model = build_mnist_model(self.config.model)
        if self.config.model == "default":
            # NHWC lets oneDNN pick its faster kernels: measured 1.4x on 2 CPU cores. With one input
            # channel the (N, 1, 28, 28) batches are already laid out the same way, so they need no copy.
            model = model.to(memory_format=torch.channels_last)
        return model

    def num_train_samples(self) -> int:
        return len(self.splits.train_y)

    def make_optimizer(self, model: nn.Module, run: RunConfig) -> torch.optim.Optimizer:
        if self.config.model == "reference":
            return torch.optim.Adam(model.parameters(), lr=run.learning_rate)  # the seed's setup
        return torch.optim.AdamW(model.parameters(), lr=run.learning_rate, weight_decay=5e-4)

    def make_scheduler(self, optimizer, run: RunConfig, total_steps: int):
        if self.config.model == "reference":  # the seed trained at a constant rate
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        return super().make_scheduler(optimizer, run, total_steps)

    def train_batches(
        self, generator: torch.Generator, batch_size: int, start_batch: int, device: torch.device
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Whole split in memory and indexed directly: a DataLoader's workers cost more than they save here.
        order = torch.randperm(self.num_train_samples(), generator=generator)
        for batch in range(start_batch, self.steps_per_epoch(batch_size)):
            index = order[batch * batch_size : (batch + 1) * batch_size]
            yield self.splits.train_x[index].to(device), self.splits.train_y[index].to(device)

    def train_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        images, labels = batch
        return F.cross_entropy(model(images), labels), len(labels)

    def _split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "val":
            return self.splits.val_x, self.splits.val_y
        if name == "test":
            return self.splits.test_x, self.splits.test_y
        raise ValueError(f"unknown split {name!r}")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split_name: str, device: torch.device) -> dict[str, float]:
        images, labels = self._split(split_name)
        was_training = model.training
        model.eval()
        correct, loss_sum = 0, 0.0
        for start in range(0, len(labels), EVAL_BATCH):
            x, y = images[start : start + EVAL_BATCH].to(device), labels[start : start + EVAL_BATCH].to(device)
            logits = model(x)
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        model.train(was_training)
        return {f"{split_name}_accuracy": correct / len(labels), f"{split_name}_loss": loss_sum / len(labels)}

    def test(self, model: nn.Module, device: torch.device) -> EvalResult:
        """Accuracy on the 10,000 untouched test images."""
        started = time.perf_counter()
        metrics = self.evaluate(model, "test", device)
        return EvalResult(
            split="test",
            metrics=metrics,
            primary_metric="test_accuracy",
            higher_is_better=True,
            samples=len(self.splits.test_y),
            seconds=time.perf_counter() - started,
        )
