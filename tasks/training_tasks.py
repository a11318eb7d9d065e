"""Prefect tasks around `training/`: load data, train (with callbacks injected), evaluate, log the model.

Tasks that take or return models and datasets use cache_policy=NONE: hashing a 200 MB tensor
to compute a cache key would cost more than the step it guards, and a training run must never
be silently replaced by a cached one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from oppen import tracking_keys as keys
from oppen.cost.spot import SpotSimulator, run_through_reclaims
from oppen.settings import OppenSettings
from oppen.story import evaluated_line
from tasks.artifacts import artifact_key
from tasks.mlflow_tasks import TrackingRun
from tasks.progress import PrefectProgressCallback
from tasks.retry import transient_only
from tasks.run_story import story_logger
from tasks.tracking import MlflowMetricsCallback, log_torch_model
from training.callbacks import Callback
from training.config import RunConfig
from training.lm.workload import LmConfig, LmWorkload
from training.loop import Trained, train
from training.mnist.workload import MnistConfig, MnistWorkload
from training.results import EvalResult
from training.runtime import select_device
from training.workload import Workload


@task(cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_only)
def load_mnist(config: MnistConfig, seed: int) -> MnistWorkload:
    """Read MNIST (local IDX files or a download) and hold out the validation split."""
    workload = MnistWorkload.load(config, seed)
    get_run_logger().info(
        "MNIST from %s: %d train / %d val / %d test images",
        workload.splits.source, len(workload.splits.train_y), len(workload.splits.val_y), len(workload.splits.test_y),
    )
    return workload


@task(cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=transient_only)
def load_wikitext(config: LmConfig) -> LmWorkload:
    """Read WikiText-2, build the tokenizer, and cut the text into training blocks."""
    workload = LmWorkload.load(config)
    get_run_logger().info(
        "WikiText-2 from %s: model %s, train split %s (%d blocks), eval split %s (%d blocks), vocab %d",
        workload.texts.source, workload.model_kind, workload.texts.train_split, len(workload.train_blocks),
        workload.texts.eval_split, len(workload.eval_blocks), workload.vocab_size,
    )
    return workload


@task(cache_policy=NONE)
def train_model(
    workload: Workload, run: RunConfig, checkpoint_dir: Path, tracking: TrackingRun,
    extra_callbacks: list[Callback] | None = None, spot: SpotSimulator | None = None,
) -> Trained:
    """The training loop, with MLflow metrics, Prefect progress and any extra callbacks (cost meter) attached.

    With a spot simulator, a simulated reclaim throws away the work since the last checkpoint and the
    loop restarts from that checkpoint, as a rescheduled pod would; the meter keeps billing throughout.
    """
    logger = get_run_logger()
    progress = PrefectProgressCallback(logger, key=artifact_key("progress"))
    callbacks: list[Callback] = [MlflowMetricsCallback(tracking.sink, run.log_every_steps), progress,
                                 *(extra_callbacks or [])]
    if spot is not None:
        callbacks.append(spot)
    try:
        trained = run_through_reclaims(
            lambda: train(workload, run, callbacks, checkpoint_dir=checkpoint_dir),
            on_reclaim=lambda number, reclaim: logger.warning("attempt %d: %s", number, reclaim),
        )
    finally:
        progress.close()  # its sender thread, also when training fails or is preempted
    result = trained.result
    # Where this attempt started: > 0 after a preemption (resumed from a checkpoint).
    tracking.log({keys.STEPS_COMPLETED: result.steps, keys.RESUMED_FROM_STEP: result.resumed_from_step,
                  keys.TRAIN_SECONDS: result.train_seconds, keys.CALLBACK_SECONDS: result.callback_seconds},
                 result.steps)
    logger.info(
        "trained %d/%d steps in %.1fs (%.0f samples/s)%s",
        result.steps, result.total_steps, result.train_seconds, result.samples_per_second,
        f"; stopped early: {result.stop_reason}" if result.stopped_early else "",
    )
    return trained


@task(cache_policy=NONE)
def evaluate_model(
    workload: MnistWorkload | LmWorkload, trained: Trained, run: RunConfig, tracking: TrackingRun
) -> EvalResult:
    """Score the trained model on held-out data and record the figures in the run."""
    evaluation = workload.test(trained.model, select_device(run.device))
    tracking.log({keys.metric_key(name): value for name, value in evaluation.metrics.items()}, trained.result.steps)
    story_logger().info(evaluated_line(evaluation.primary_metric, evaluation.primary_value, evaluation.split,
                                       evaluation.samples))
    return evaluation


def _input_example(workload: Workload) -> np.ndarray:
    if isinstance(workload, MnistWorkload):
        return workload.splits.test_x[:2].numpy()
    if isinstance(workload, LmWorkload):
        return workload.eval_blocks[:1].numpy()
    raise TypeError(f"no input example known for {type(workload).__name__}")


@task(cache_policy=NONE)
def log_model(workload: Workload, trained: Trained, settings: OppenSettings, mlflow_run_id: str, name: str) -> str:
    """Store the model, named after its workload's model (mnist-cnn), with an input example; returns its URI."""
    extra = []
    if isinstance(workload, LmWorkload):
        import transformers

        extra.append(f"transformers=={transformers.__version__}")
    return log_torch_model(settings, mlflow_run_id, trained.model, _input_example(workload), name, extra)
