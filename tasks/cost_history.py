"""Speed history in MLflow: each settled run records how fast it went, under a key of what sets speed."""

from __future__ import annotations

import hashlib
import json

from mlflow import MlflowClient

from oppen.cost.price_book import Resources
from oppen.cost.speed import PastRun
from training.config import RunConfig

SPEED_KEY_TAG = "oppen.speed_key"
SPEED_METRICS = ("cost_seconds_per_sample", "cost_epoch_overhead_s", "cost_fixed_overhead_s", "cost_tail_s")
SHAPE_METRIC = "shape_steps_per_epoch"  # lets the next run of the same request be quoted before its data is read


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
    """Finished runs with this key, newest first, that recorded a speed (interrupted runs do not)."""
    found = client.search_runs(
        experiment_ids=[e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.`{SPEED_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=limit * 3,
    )
    runs = []
    for run in found:
        metrics = run.data.metrics
        if "cost_seconds_per_sample" not in metrics or metrics["cost_seconds_per_sample"] <= 0:
            continue
        runs.append(PastRun(
            steps_per_epoch=int(metrics[SHAPE_METRIC]) if metrics.get(SHAPE_METRIC, 0) >= 1 else None,
            seconds_per_sample=metrics["cost_seconds_per_sample"],
            epoch_overhead_seconds=max(0.0, metrics.get("cost_epoch_overhead_s", 0.0)),
            fixed_overhead_seconds=max(0.0, metrics.get("cost_fixed_overhead_s", 0.0)),
            tail_seconds=max(0.0, metrics.get("cost_tail_s", 0.0)),
        ))
    return runs[:limit]
