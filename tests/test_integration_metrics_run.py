"""A real Prometheus scrapes a real MNIST training run through its file_sd target, and forgets it when it ends.

The run trains on real MNIST (a 2,048-image slice, as in test_training_mnist.py) with the real cost
meter; Prometheus reads the committed local scrape config (infra/monitoring/scrape/prometheus-local.yml)
pointed at this test's targets directory, scraping every second. In the middle of epoch 2 a callback
holds the loop until Prometheus has the run's series (so the test does not depend on how fast this
machine trains), and reads them back through Prometheus' HTTP API.
"""

from __future__ import annotations

import uuid

import pytest

from oppen.cost.meter import CostMeter
from oppen.cost.price_book import Resources, load_price_book
from oppen.metrics.catalog import RUN_LABELS, RUN_METRICS
from oppen.metrics.run_cost import meter_reading
from oppen.metrics.run_exporter import RunExporter, RunIdentity
from tests.prometheus import PrometheusServer, local_scrape_configs, needs_prometheus, value
from tests.stack import poll_until
from training.callbacks import Callback
from training.config import RunConfig
from training.loop import train
from training.mnist.data import split
from training.mnist.workload import MnistConfig, MnistWorkload

pytestmark = [pytest.mark.slow, needs_prometheus]

SMALL = 2048  # training images: 8 steps of 256 an epoch
BATCH = 256
HOLD_AT_STEP = 10  # epoch 2's second step: epoch 1 has ended, so its validation figures exist


@pytest.fixture(scope="module")
def workload(mnist_arrays):
    splits = split(mnist_arrays, val_size=1000, seed=0)
    small = type(splits)(
        train_x=splits.train_x[:SMALL], train_y=splits.train_y[:SMALL], val_x=splits.val_x, val_y=splits.val_y,
        test_x=splits.test_x[:2000], test_y=splits.test_y[:2000], source=splits.source,
    )
    return MnistWorkload(MnistConfig(val_size=1000), small)


class HoldUntilScraped(Callback):
    """Before step `at_step`, waits until Prometheus has scraped the run mid-training, and keeps what it read."""

    def __init__(self, prometheus: PrometheusServer, flow_run_id: str, at_step: int) -> None:
        self.prometheus, self.selector, self.at_step = prometheus, f'flow_run_id="{flow_run_id}"', at_step
        self.series: list[dict] = []

    def on_step_begin(self, step, control):
        if step.step != self.at_step:
            return
        # What can only be there once the run is well under way: epoch 1's validation, a CPU figure
        # (two resource samples), the meter's forecast, and the step the loop is held at.
        for query in (f"oppen_training_validation_metric{{{self.selector}}}", f"oppen_run_cpu_percent{{{self.selector}}}",
                      f"oppen_run_cost_forecast_usd{{{self.selector}}}",
                      f"oppen_training_step{{{self.selector}}} >= {self.at_step - 1}"):
            self.prometheus.wait_for(query)
        self.series = self.prometheus.query(f"{{{self.selector}}}")


def test_prometheus_scrapes_a_training_run_and_drops_it_when_the_run_ends(tmp_path, workload):
    targets = tmp_path / "metrics-targets"
    identity = RunIdentity(flow_run_id=str(uuid.uuid4()), workload="mnist", experiment="metrics-it", team="default")
    resources = Resources(cpu_cores=2)
    meter = CostMeter(load_price_book(), resources, cap_usd=0.01)
    run = RunConfig(epochs=3, batch_size=BATCH, learning_rate=5e-3, max_steps=20)

    with PrometheusServer(tmp_path, local_scrape_configs(runs_dir=targets)) as prometheus:
        with RunExporter(identity, resources, targets_dir=targets, cost=lambda: meter_reading(meter),
                         sample_every_s=0.5) as exporter:
            assert exporter.target == targets / f"{identity.flow_run_id}.json" and exporter.target.exists()
            hold = HoldUntilScraped(prometheus, identity.flow_run_id, HOLD_AT_STEP)
            trained = train(workload, run, [meter, *exporter.callbacks(expected_epoch_seconds=30.0), hold])
        assert not (targets / f"{identity.flow_run_id}.json").exists()
        # The target leaves discovery (Prometheus applies discovery changes every 5 s), and its series are
        # marked stale: an instant query finds none.
        dropped = poll_until(lambda: not [t for t in prometheus.active_targets() if t["labels"]["job"] == "oppen-runs"],
                             timeout=60, interval=0.5)
        assert dropped, prometheus.active_targets()
        assert not prometheus.query(f'oppen_training_step{{flow_run_id="{identity.flow_run_id}"}}')

    assert trained.result.steps == 20 and trained.result.history
    by_name: dict[str, list[dict]] = {}
    for series in hold.series:
        by_name.setdefault(series["metric"]["__name__"], []).append(series)
    # Every run series of the catalog arrived, except the GPU ones: this run holds no GPU.
    expected = {spec.name for spec in RUN_METRICS} - {"oppen_run_gpu_utilization_percent", "oppen_run_gpu_memory_bytes"}
    assert set(by_name) == expected
    for series in hold.series:
        labels = series["metric"]
        assert {name: labels[name] for name in RUN_LABELS} == identity.labels()
        assert labels["job"] == "oppen-runs" and labels["instance"] == exporter.address
        assert not [name for name in labels if name.startswith("__meta")]  # the pid and host stay in discovery
    one = {name: value(series[0]) for name, series in by_name.items()}
    assert one["oppen_training_epoch"] == 2 and one["oppen_training_total_steps"] == 20
    assert HOLD_AT_STEP - 1 <= one["oppen_training_step"] < HOLD_AT_STEP
    assert one["oppen_training_loss"] > 0 and one["oppen_training_samples_per_second"] > 0
    assert one["oppen_training_expected_epoch_seconds"] == 30.0 and one["oppen_training_epoch_seconds"] > 0
    validation = {series["metric"]["metric"]: value(series) for series in by_name["oppen_training_validation_metric"]}
    assert validation == pytest.approx(trained.result.history[0].metrics)  # epoch 1's, as the loop recorded them
    assert one["oppen_run_cpu_cores_requested"] == 2 and one["oppen_run_gpus"] == 0
    assert one["oppen_run_cpu_percent"] > 0 and 0 < one["oppen_run_memory_bytes"] < one["oppen_run_memory_limit_bytes"]
    assert one["oppen_run_cost_cap_usd"] == 0.01
    assert 0 < one["oppen_run_cost_accrued_usd"] <= meter.run_usd  # the meter only grows after the scrape
    assert one["oppen_run_cost_forecast_usd"] >= one["oppen_run_cost_accrued_usd"]
