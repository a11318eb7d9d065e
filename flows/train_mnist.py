"""The MNIST training flow."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.states import State
from pydantic import Field

from flows.pipeline import TrainingRequest, WorkloadPlan, training_pipeline
from oppen.cost.policy import CostPolicy
from oppen.names import ExperimentName, ModelName
from tasks.training_tasks import load_mnist
from training.config import RunConfig
from training.mnist.data import local_directory
from training.mnist.workload import MnistConfig, MnistWorkload

# Measured defaults for the fast CNN: 2 epochs at batch 256 with a one-cycle peak of 8e-3 reach
# >= 99% test accuracy in about 25 s on 2 CPU cores (bench/mnist_speed.py).
MNIST_RUN = RunConfig(epochs=2, batch_size=256, learning_rate=8e-3)


# Persisted: if the final state is retried, the server's copy comes back, and only a stored result survives.
@flow(name="train-mnist", log_prints=True, validate_parameters=True, persist_result=True)
def train_mnist(
    config: MnistConfig = MnistConfig(),
    run: RunConfig = MNIST_RUN,
    experiment: ExperimentName = "mnist",
    model_name: ModelName = "mnist-cnn",
    min_test_accuracy: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.98,
    cost: CostPolicy = CostPolicy(),
) -> State:
    """Train an MNIST CNN, log it to MLflow and register it as `development` when accurate enough."""
    local = local_directory(config.data_dir)
    plan = WorkloadPlan(
        name="mnist", config=config, data_source=str(local) if local else "hub",
        check=lambda: MnistWorkload.check_request(config, run), load=lambda: load_mnist(config, run.seed),
    )
    return training_pipeline(TrainingRequest(plan, run, experiment, model_name, min_test_accuracy, cost))
