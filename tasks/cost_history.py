"""Speed history in MLflow: each settled run records how fast it went, under a key of what sets speed."""

from __future__ import annotations

import hashlib
import json

from mlflow import MlflowClient

from oppen import tracking_keys as keys
from oppen.cost.price_book import Resources
from oppen.cost.speed import PastRun
from training.config import RunConfig

SPEED_KEY_TAG = "oppen.speed_key"
SPEED_METRICS = (keys.SECONDS_PER_SAMPLE, keys.EPOCH_OVERHEAD_SECONDS, keys.FIXED_OVERHEAD_SECONDS, keys.TAIL_SECONDS)


def speed_key(workload_name: str, request_config: dict, data_source: str, run: RunConfig, resources: Resources,
              device: str) -> str:
    """What determines seconds per sample: the model and data as requested, batch size, threads, hardware.

    Computed from the request alone (no data read), so a run with history is quoted, and refused
    if it cannot fit its budget, before anything is loaded. Epochs, learning rate, seed and
    max_steps change how long a run is, not how fast it goes, so runs that differ only there
    share their history.
    """
    payload = {
        "workload": workload_name,
        "config": request_config,
        "data": data_source,
        "batch_size": run.batch_size,
        "num_threads": run.num_threads,
        "device": device.split(":")[0],
        "resources": resources.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def past_runs(client: MlflowClient, key: str, limit: int = 10) -> list[PastRun]:
    """Finished runs with this key, newest first, that recorded a speed (interrupted runs do not).

    The speed is in the filter, so MLflow returns only runs that count: each run it returns costs the
    store a read of all its params, tags and metrics, the bulk of a quote's time.
    """
    found = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{SPEED_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED' "
                      f"and metrics.`{keys.SECONDS_PER_SAMPLE}` > 0",
        order_by=["attributes.start_time DESC"],
        max_results=limit,
    )
    return [past_run(run.data.metrics, run.data.params) for run in found]


def past_run(metrics: dict[str, float], params: dict[str, str]) -> PastRun:
    steps_per_epoch = params.get(keys.STEPS_PER_EPOCH_PARAM)
    return PastRun(
        steps_per_epoch=int(steps_per_epoch) if steps_per_epoch and steps_per_epoch.isdigit() else None,
        seconds_per_sample=metrics[keys.SECONDS_PER_SAMPLE],
        epoch_overhead_seconds=max(0.0, metrics.get(keys.EPOCH_OVERHEAD_SECONDS, 0.0)),
        fixed_overhead_seconds=max(0.0, metrics.get(keys.FIXED_OVERHEAD_SECONDS, 0.0)),
        tail_seconds=max(0.0, metrics.get(keys.TAIL_SECONDS, 0.0)),
    )
