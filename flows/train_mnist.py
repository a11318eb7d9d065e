"""The MNIST training flow."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.states import State
from pydantic import Field

from flows.pipeline import training_pipeline
from oppen.cost.policy import CostPolicy
from tasks.summary import TrainingSummary
from tasks.training_tasks import load_mnist
from training.config import RunConfig
from training.mnist.workload import MnistConfig

# Measured defaults for the fast CNN: 2 epochs at batch 256 with a one-cycle peak of 8e-3 reach
# >= 99% test accuracy in about 25 s on 2 CPU cores (bench/mnist_speed.py).
MNIST_RUN = RunConfig(epochs=2, batch_size=256, learning_rate=8e-3)


@flow(name="train-mnist", log_prints=True, validate_parameters=True)
def train_mnist(
    config: MnistConfig = MnistConfig(),
    run: RunConfig = MNIST_RUN,
    experiment: Annotated[str, Field(min_length=1)] = "mnist",
    model_name: Annotated[str, Field(min_length=1)] = "mnist-cnn",
    min_test_accuracy: Annotated[float, Field(ge=0.0, le=1.0)] = 0.98,
    cost: CostPolicy = CostPolicy(),
) -> TrainingSummary | State:
    """Train an MNIST CNN, log it to MLflow and register it as `development` when accurate enough."""
    return training_pipeline(
        workload_name="mnist",
        load=lambda: load_mnist(config, run.seed),
        run=run,
        params={"config": config.model_dump(mode="json")},
        experiment=experiment,
        model_name=model_name,
        threshold=min_test_accuracy,
        cost=cost,
    )
