"""The run exporter's lifecycle: it serves while the block runs and leaves nothing behind on any exit."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from oppen.cost.price_book import Resources
from oppen.metrics.catalog import ALL, RUN_LABELS
from oppen.metrics.file_sd import HOST_LABEL, PID_LABEL, prune_stale_targets, remove_target, write_target
from oppen.metrics.run_cost import CostReading
from oppen.metrics.run_exporter import RunExporter, RunIdentity
from training.callbacks import LoopControl, RunInfo, StepInfo

IDENTITY = RunIdentity(flow_run_id="0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", workload="mnist", experiment="mnist",
                       team="vision")


def scrape(exporter: RunExporter) -> dict[str, list]:
    with urllib.request.urlopen(f"http://{exporter.address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    with socket.socket() as sock:
        return sock.connect_ex((host, int(port))) != 0


def exporter(tmp_path, **kwargs) -> RunExporter:
    return RunExporter(IDENTITY, Resources(cpu_cores=2, memory_gib=4), targets_dir=tmp_path / "targets", **kwargs)


def test_identity_labels_are_the_catalogs_and_a_run_id_cannot_leave_the_targets_dir():
    assert tuple(IDENTITY.labels()) == RUN_LABELS
    for bad in ("../escape", "a/b", ""):
        with pytest.raises(ValidationError):
            RunIdentity(flow_run_id=bad, workload="mnist", experiment="e", team="t")
    with pytest.raises(ValidationError):
        RunIdentity(flow_run_id="x", workload="mnist", experiment="e", team="t", pool="local")


def test_serves_the_runs_series_and_publishes_its_target_while_open(tmp_path):
    with exporter(tmp_path, cost=lambda: CostReading(0.25, 0.5, None)) as metrics:
        (training,) = metrics.callbacks(expected_epoch_seconds=12.0)
        control = LoopControl()
        training.on_train_start(RunInfo("mnist", "cpu", 40, 20, 2, 64, 0, {}), control)
        training.on_step_begin(StepInfo(1, 1, 1, 20, 40, 64), control)
        training.on_step_end(StepInfo(1, 1, 1, 20, 40, 64, loss=2.5, step_seconds=0.01), control)
        families = scrape(metrics)
        target = json.loads(metrics.target.read_text())
    assert target[0]["targets"] == [metrics.address] and metrics.address.startswith("127.0.0.1:")
    assert target[0]["labels"][PID_LABEL] == str(os.getpid())
    assert set(families) <= set(ALL)
    for samples in families.values():
        for sample in samples:
            assert {name: sample.labels[name] for name in RUN_LABELS} == IDENTITY.labels()
    assert families["oppen_training_loss"][0].value == 2.5
    assert families["oppen_training_step"][0].value == 1 and families["oppen_training_total_steps"][0].value == 40
    assert families["oppen_training_expected_epoch_seconds"][0].value == 12.0
    assert families["oppen_run_memory_limit_bytes"][0].value == 4 * 1024**3
    assert families["oppen_run_cost_accrued_usd"][0].value == 0.25
    assert "oppen_run_cost_cap_usd" not in families  # no cap, no series: "absent" is what the alert rules test
    assert "oppen_training_validation_metric" not in families  # no epoch has ended yet


def test_leaving_removes_the_target_and_stops_serving(tmp_path):
    with exporter(tmp_path) as metrics:
        address, target = metrics.address, metrics.target
        assert target.exists() and not refused(address)
    assert not target.exists() and refused(address)
    assert not metrics.serving and metrics.target is None


def test_an_exception_in_the_block_cleans_up_and_goes_on_up(tmp_path):
    with pytest.raises(RuntimeError, match="training blew up"):
        with exporter(tmp_path) as metrics:
            address, target = metrics.address, metrics.target
            raise RuntimeError("training blew up")
    assert not target.exists() and refused(address)
    assert not metrics.sampler._thread.is_alive()


def test_switched_off_it_serves_nothing_and_adds_no_callback(tmp_path):
    with exporter(tmp_path, port=None) as metrics:
        assert metrics.callbacks() == [] and metrics.address is None and not metrics.serving
    assert not (tmp_path / "targets").exists()


def test_a_port_in_use_is_one_warning_and_training_goes_on_without_it(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with caplog.at_level(logging.WARNING, logger="oppen.metrics"), \
                exporter(tmp_path, port=taken.getsockname()[1]) as metrics:
            assert not metrics.serving and metrics.callbacks() == []
    assert "run metrics are off for this run" in caplog.text
    assert not (tmp_path / "targets").exists() or not list((tmp_path / "targets").iterdir())


def test_a_failing_cost_reader_costs_the_cost_series_not_the_scrape(tmp_path, caplog):
    def broken():
        raise KeyError("meter")

    with caplog.at_level(logging.WARNING, logger="oppen.metrics"), exporter(tmp_path, cost=broken) as metrics:
        first, second = scrape(metrics), scrape(metrics)
    for families in (first, second):
        assert "oppen_run_memory_bytes" in families and "oppen_run_cost_accrued_usd" not in families
    assert caplog.text.count("reading the run's cost") == 1  # said once, not on every scrape


def test_targets_of_killed_runs_are_pruned_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = write_target(tmp_path, "live-run", "127.0.0.1:1")
    killed = write_target(tmp_path, "killed-run", "127.0.0.1:2")
    group = json.loads(killed.read_text())
    group[0]["labels"][PID_LABEL] = str(dead.pid)
    killed.write_text(json.dumps(group))
    elsewhere = write_target(tmp_path, "other-host-run", "10.0.0.1:3")
    group = json.loads(elsewhere.read_text())
    group[0]["labels"] |= {PID_LABEL: str(dead.pid), HOST_LABEL: "another-machine"}
    elsewhere.write_text(json.dumps(group))
    (tmp_path / "not-ours.json").write_text("[]")

    assert prune_stale_targets(tmp_path) == [killed]
    assert live.exists() and elsewhere.exists() and (tmp_path / "not-ours.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))  # staging files never stay behind


def test_a_target_rewritten_by_the_next_attempt_of_the_run_is_not_removed_by_the_exiting_one(tmp_path):
    path = write_target(tmp_path, IDENTITY.flow_run_id, "127.0.0.1:1")
    group = json.loads(path.read_text())
    group[0]["labels"][PID_LABEL] = str(os.getpid() + 1)  # the rescheduled attempt, another process
    path.write_text(json.dumps(group))
    remove_target(path)
    assert path.exists()
    write_target(tmp_path, IDENTITY.flow_run_id, "127.0.0.1:1")
    remove_target(path)
    assert not path.exists()
