"""MLflow adapter: explicit run ids through MlflowClient, never the fluent thread-local active run.

Prefect runs tasks in worker threads; MLflow's fluent "active run" is thread-local, so every call
here names its run id.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

import training
from oppen import tracking_keys as keys
from oppen.settings import OppenSettings
from tasks.metric_sink import MetricSink
from training.callbacks import Callback, LoopControl, StepInfo
from training.results import EpochRecord

MAX_PARAM_LENGTH = 6000  # MLflow's limit on one param value


def use_process_uris(settings: OppenSettings) -> None:
    """Flavor logging and register_model read the process-wide URIs; set them at call time, never at import."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)


def client_for(settings: OppenSettings) -> MlflowClient:
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """The experiment's id, created when missing; marked as model training, so MLflow's UI opens it on its runs."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.tags.get(keys.EXPERIMENT_KIND_TAG) is None:  # made before this, or outside Oppen
            client.set_experiment_tag(existing.experiment_id, keys.EXPERIMENT_KIND_TAG, keys.MODEL_TRAINING_KIND)
        return existing.experiment_id
    location = f"{artifact_root.rstrip('/')}/{name}" if artifact_root else None
    try:
        return client.create_experiment(name, artifact_location=location,
                                        tags={keys.EXPERIMENT_KIND_TAG: keys.MODEL_TRAINING_KIND})
    except mlflow.exceptions.MlflowException:
        # Another run created it between our lookup and create: use theirs.
        return client.get_experiment_by_name(name).experiment_id


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → MLflow params ("run.epochs": "2")."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    flat = flatten(params)
    items = [Param(key, value) for key, value in sorted(flat.items())]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100], synchronous=True)


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int,
                tags: Mapping[str, str] | None = None) -> None:
    """Metrics (and tags) in one request: each round trip to a busy tracking server counts."""
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()],
        tags=[RunTag(key, value) for key, value in (tags or {}).items()], synchronous=True,
    )


class MlflowMetricsCallback(Callback):
    """Per-epoch metrics (and a smoothed step loss) into one MLflow run, through a non-blocking sink.

    Keys are grouped (train/..., val/...), so MLflow draws them in sections.
    """

    def __init__(self, sink: MetricSink, log_every_steps: int) -> None:
        self.sink, self.every = sink, log_every_steps
        self._loss_sum, self._loss_count = 0.0, 0

    def on_step_end(self, step: StepInfo, control: LoopControl) -> None:
        self._loss_sum += step.loss or 0.0
        self._loss_count += 1
        if step.step % self.every == 0:
            self.sink.log({keys.TRAIN_LOSS: self._loss_sum / self._loss_count}, step.step)
            self._loss_sum, self._loss_count = 0.0, 0

    def on_epoch_end(self, epoch: EpochRecord, control: LoopControl) -> None:
        metrics = {
            keys.EPOCHS_DONE: epoch.epoch,
            keys.TRAIN_EPOCH_LOSS: epoch.train_loss,
            keys.EPOCH_SECONDS: epoch.epoch_seconds,
            keys.SAMPLES_PER_SECOND: epoch.samples_per_second,
            **{keys.metric_key(name): value for name, value in epoch.metrics.items()},
        }
        self.sink.log(metrics, epoch.step)


def pip_requirements(extra: list[str] | None = None) -> list[str]:
    """Explicit requirements: MLflow's inference costs ~9 s per model and guesses from the whole env."""
    import cloudpickle
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", f"cloudpickle=={cloudpickle.__version__}", *(extra or [])]


def log_torch_model(
    settings: OppenSettings, run_id: str, model, input_example, name: str, extra_requirements: list[str] | None = None
) -> str:
    """Log the model into the run; returns its model URI.

    serialization_format="pickle": 0.05 s for a small CNN versus ~2.6 s for torch.export's "pt2",
    which also cannot trace every Hugging Face model. Pickle needs the model's classes importable
    at load time, so the `training` package travels with the model as code_paths.
    """
    import mlflow.pytorch

    use_process_uris(settings)
    client = client_for(settings)
    # Created here, in the run's own experiment: left to itself the flavor would file the model
    # under the fluent "active experiment" (Default) with artifacts in the worker's cwd.
    logged = client.create_logged_model(
        experiment_id=client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id
    )
    info = mlflow.pytorch.log_model(
        model.cpu().eval(),
        name=name,
        model_id=logged.model_id,
        run_id=run_id,
        input_example=input_example,
        pip_requirements=pip_requirements(extra_requirements),
        serialization_format="pickle",
        code_paths=[str(Path(training.__file__).parent)],
    )
    client.finalize_logged_model(logged.model_id, status="READY")
    return info.model_uri


def finish_run(client: MlflowClient, run_id: str, status: str) -> None:
    client.set_terminated(run_id, status=status)
