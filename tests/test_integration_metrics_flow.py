"""The training flow serves its run's metrics: a real Prometheus scrapes a real train-mnist run through the flow.

tests/test_integration_metrics_run.py proves the exporter against the training loop; this proves the
pipeline wires it: the flow run publishes its file_sd target, Prometheus scrapes its training, resource
and cost series under its flow-run id while it trains, and the target is gone when the run ends.
"""

from __future__ import annotations

import pytest

from flows.train_mnist import train_mnist
from oppen.cost.money import to_micros
from oppen.metrics.catalog import RUN_LABELS
from tests.prometheus import PrometheusServer, local_scrape_configs, needs_prometheus, value
from tests.stack import poll_until
from training.config import RunConfig

pytestmark = [pytest.mark.slow, pytest.mark.integration, needs_prometheus]


def test_a_training_flow_run_is_scraped_while_it_trains(in_process, tmp_path, monkeypatch):
    targets = tmp_path / "targets"
    targets.mkdir()  # Prometheus watches the directory: it must exist when Prometheus starts
    monkeypatch.setenv("OPPEN_METRICS_TARGETS_DIR", str(targets))
    with PrometheusServer(tmp_path, local_scrape_configs(runs_dir=targets)) as prometheus:
        summary = train_mnist(run=RunConfig(epochs=2, batch_size=256, learning_rate=8e-3, max_steps=300),
                              experiment="scraped", min_test_accuracy=0.0, cost={"max_cost_usd": 0.5})
        assert not list(targets.glob("*.json"))  # withdrawn when the run ended
        run = f'flow_run_id="{summary.flow_run_id}"'
        # Over the run's life (its series are stale now, its samples kept): what the flow served, by name.
        steps = prometheus.wait_for(f"max_over_time(oppen_training_step{{{run}}}[10m])")
        assert 0 < value(steps[0]) <= 300
        (accrued,) = prometheus.wait_for(f"max_over_time(oppen_run_cost_accrued_usd{{{run}}}[10m])")
        assert 0 < to_micros(value(accrued)) <= summary.cost.run_cost_micros  # what it had cost, never more
        (cap,) = prometheus.wait_for(f"max_over_time(oppen_run_cost_cap_usd{{{run}}}[10m])")
        assert value(cap) == 0.5
        validation = prometheus.wait_for(f"max_over_time(oppen_training_validation_metric{{{run}}}[10m])")
        by_metric = {sample["metric"]["metric"]: value(sample) for sample in validation}
        assert 0 < by_metric["val_accuracy"] <= 1, by_metric
        (series,) = prometheus.api("series", **{"match[]": f"oppen_run_memory_bytes{{{run}}}"})
        assert {label: series[label] for label in RUN_LABELS} == {
            "flow_run_id": summary.flow_run_id, "workload": "mnist", "experiment": "scraped", "team": "default"}
        # Gone from the targets Prometheus scrapes, so no series of this run goes on being collected.
        assert poll_until(lambda: not [t for t in prometheus.active_targets()
                                       if t["labels"].get("flow_run_id") == summary.flow_run_id], 30)
