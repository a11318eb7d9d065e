"""Read runs back from MLflow as the recommender's RunRecords (the MLflow side of oppen.cost.recommend)."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone

from mlflow import MlflowClient
from mlflow.entities import Run

from oppen import tracking_keys as keys
from oppen.cost.price_book import Resources
from oppen.cost.recommend import RunRecord

# Each workload's metrics as the flows name them (the registry's, the threshold's); their MLflow keys
# are keys.metric_key(name): val/accuracy, test/accuracy, eval/perplexity.
VAL_METRICS = {"mnist": ("val_accuracy", True), "lm": ("val_perplexity", False)}
TEST_METRICS = {"mnist": ("test_accuracy", True), "lm": ("eval_perplexity", False)}


def _param(params: dict[str, str], key: str, cast, default):
    """MLflow stores params as strings; an unset optional field was logged as "None"."""
    value = params.get(key)
    return default if value in (None, "", "None") else cast(value)


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.value for m in points]


def record_of(client: MlflowClient, run: Run, *, epoch_costs: bool = True, val_history: bool = True) -> RunRecord | None:
    """None for runs that never settled a cost (refused, or from before the cost engine).

    Each history is one more request to MLflow: a peer's record leaves out what the recommender
    never reads of it (see `history_of`).
    """
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    if keys.COST_TOTAL not in metrics:
        return None
    workload = tags.get("oppen.workload", "")
    resources = Resources(
        gpus=_param(params, "cost.resources.gpus", int, 0),
        gpu_type=_param(params, "cost.resources.gpu_type", str, None),
        cpu_cores=_param(params, "cost.resources.cpu_cores", float, 1.0),
        memory_gib=_param(params, "cost.resources.memory_gib", float, 0.0),
    )
    val_key, higher = VAL_METRICS.get(workload, (None, True))
    test_key, _ = TEST_METRICS.get(workload, (None, True))
    # Each epoch's own cost, summed into the run's cost at each epoch's end (what the recommender prices).
    epochs_costs = list(itertools.accumulate(_history(client, run.info.run_id, keys.COST_EPOCH))) if epoch_costs else []
    val = _history(client, run.info.run_id, keys.metric_key(val_key)) if val_key and val_history else []
    checkpoint_every = _param(params, "run.checkpoint_every_steps", int, 0)
    speed = metrics.get(keys.SECONDS_PER_SAMPLE)
    batch = _param(params, "run.batch_size", int, 1)
    return RunRecord(
        run_id=run.info.run_id,
        workload=workload,
        started_at=datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc),
        batch_size=batch,
        learning_rate=_param(params, "run.learning_rate", float, 0.0),
        epochs=_param(params, "run.epochs", int, 0),
        resources=resources,
        spot=params.get("cost.spot") == "True",
        checkpointed=True,  # every pipeline run checkpoints at epoch ends (and every N steps when asked)
        cost_usd=metrics[keys.COST_TOTAL],
        seconds=metrics.get(keys.PEAK_SECONDS, 0.0) + metrics.get(keys.OFF_PEAK_SECONDS, 0.0),
        peak_seconds=metrics.get(keys.PEAK_SECONDS, 0.0),
        samples_per_second=(1.0 / speed) if speed else None,
        metric_name=test_key,
        metric_value=metrics.get(keys.metric_key(test_key)) if test_key else None,
        higher_is_better=higher,
        val_history=val,
        epoch_costs=epochs_costs if len(epochs_costs) == len(val) else [],
        cpu_cores_mean=metrics.get(keys.CPU_CORES_MEAN),
        cpu_cores_peak=metrics.get(keys.CPU_CORES_PEAK),
        memory_peak_gib=metrics.get(keys.MEMORY_PEAK_GIB),
        gpu_util_mean=metrics.get(keys.GPU_UTIL_MEAN),
        checkpoint_interval_seconds=(checkpoint_every * batch * speed) if checkpoint_every and speed else None,
    )


def history_of(client: MlflowClient, run: Run, limit: int = 50) -> list[RunRecord]:
    """Settled runs of the same workload in any experiment, newest first."""
    workload = run.data.tags.get("oppen.workload", "")
    found = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`oppen.workload` = '{workload}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    # The recommender reads a peer's epochs only to see whether another learning rate at the same batch size
    # got there sooner (oppen.cost.recommend.learning_rate), and never its epoch costs: requests saved per peer.
    params = run.data.params

    def compared_epoch_by_epoch(other: Run) -> bool:
        theirs = other.data.params
        return (theirs.get("run.batch_size") == params.get("run.batch_size")
                and theirs.get("run.learning_rate") != params.get("run.learning_rate"))

    records = (record_of(client, other, epoch_costs=False, val_history=compared_epoch_by_epoch(other))
               for other in found if other.info.run_id != run.info.run_id)
    return [record for record in records if record is not None]
