"""The event catalog and the run's own events: names, resources, deterministic ids, and when each fires."""

from __future__ import annotations

import ast
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import oppen.events as events_module
from oppen.display import usd
from oppen.cost.meter import CostMeter
from oppen.cost.price_book import PriceBook, Resources
from oppen.cost.quote import make_quote
from oppen.cost.speed import RunShape, from_calibration
from oppen.cost.utilization import Utilization
from oppen.events import (
    CATALOG,
    GPU_UNDERUTILIZED,
    MODEL_PROMOTED,
    RunEventContext,
    emit,
    model_event_id,
    model_resource,
)
from tasks.off_peak import deferral_message
from training.callbacks import LoopControl, RunInfo
from training.results import EpochRecord

ROOT = Path(__file__).resolve().parents[1]
BOOK = PriceBook()
NOON = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def test_every_oppen_event_name_in_the_code_is_in_the_catalog():
    """A typo in an event name would silently never fire an automation: every `oppen.x.y` literal must be catalogued."""
    names = set()
    for path in [*ROOT.glob("oppen/**/*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("flows/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.count(".") == 2:
                parts = node.value.split(".")
                # oppen.model.<label>, oppen.alert.<label>: resource labels, not events
                labels = {"", "name", "version", "alias", "severity", "fingerprint"}
                if parts[0] == "oppen" and parts[1] in {"budget", "cost", "model", "training", "gpu", "notification",
                                                        "alert"} and parts[2] not in labels:
                    names.add(node.value)
    assert names and names <= set(CATALOG), sorted(names - set(CATALOG))


def test_the_catalog_names_follow_prefects_grammar():
    for name, spec in CATALOG.items():
        prefix, noun, what = name.split(".")
        assert prefix == "oppen" and noun and what and spec.resource in {"run", "model", "alert"} \
            and "links" in spec.payload


def test_a_run_event_names_its_flow_run_deployment_team_experiment_and_mlflow_run():
    context = RunEventContext(flow_run_id="fr-1", team="vision", experiment="mnist", workload="mnist",
                              flow_run_name="brave-fox", deployment_id="dep-1", mlflow_run_id="ml-1")
    assert context.resource() == {"prefect.resource.id": "oppen.run.fr-1", "oppen.team": "vision",
                                  "oppen.experiment": "mnist", "oppen.workload": "mnist",
                                  "prefect.resource.name": "brave-fox"}
    roles = {r["prefect.resource.role"]: r["prefect.resource.id"] for r in context.related()}
    assert roles == {"flow-run": "prefect.flow-run.fr-1", "deployment": "prefect.deployment.dep-1",
                     "team": "oppen.team.vision", "experiment": "oppen.experiment.mnist", "mlflow-run": "mlflow.run.ml-1"}


def test_model_events_have_one_id_per_registration_whoever_reports_it():
    first = model_event_id(MODEL_PROMOTED, "cnn", 3, "development")
    assert first == model_event_id(MODEL_PROMOTED, "cnn", "3", "development")
    assert first != model_event_id(MODEL_PROMOTED, "cnn", 3, "staging") != model_event_id(MODEL_PROMOTED, "cnn", 4, "development")
    assert model_resource("cnn", 3, "development")["oppen.model.alias"] == "development"
    assert "oppen.model.alias" not in model_resource("cnn", 3)


def test_an_unknown_event_name_is_refused():
    with pytest.raises(ValueError, match="not in Oppen's event catalog"):
        emit("oppen.budget.exploded", {"prefect.resource.id": "oppen.run.x"}, [], {})


# --- training.slow ------------------------------------------------------------------------

def _epoch(epoch: int, step: int, seconds: float) -> EpochRecord:
    return EpochRecord(epoch=epoch, step=step, train_loss=1.0, metrics={}, epoch_seconds=seconds, samples_per_second=1)


def _meter(slow_factor: float | None, start_step: int = 0) -> CostMeter:
    clock_now = [NOON]
    meter = CostMeter(BOOK, Resources(cpu_cores=2), clock=lambda: clock_now[0], expected_step_seconds=1.0,
                      expected_epoch_overhead_seconds=10.0, slow_factor=slow_factor)
    meter.on_train_start(RunInfo("w", "cpu", 400, 100, 4, 32, start_step, {}), LoopControl())
    return meter


def test_an_epoch_over_twice_its_history_is_reported_once():
    meter = _meter(2.0)
    meter.on_epoch_end(_epoch(1, 100, 219.0), LoopControl())  # expected 110 s: under 2x
    meter.on_epoch_end(_epoch(2, 200, 221.0), LoopControl())
    meter.on_epoch_end(_epoch(3, 300, 500.0), LoopControl())  # slower still: already reported
    slow = [e for e in meter.events if e.name == "oppen.training.slow"]
    assert len(slow) == 1 and slow[0].payload["epoch"] == 2
    assert slow[0].payload["expected_seconds"] == pytest.approx(110.0) and slow[0].payload["ratio"] > 2.0


def test_no_slow_report_against_a_calibration_or_for_a_resumed_partial_epoch():
    for meter in (_meter(None), _meter(2.0, start_step=150)):
        meter.on_epoch_end(_epoch(2, 200, 900.0), LoopControl())
        assert not [e for e in meter.events if e.name == "oppen.training.slow"]


# --- off-peak deferral and GPU utilisation ------------------------------------------------

def test_a_deferral_states_the_saving_in_dollars_when_history_quotes_the_run():
    speed = from_calibration([3.6] * 5, batch_size=1, eval_seconds=0.0, fixed_overhead_seconds=0.0)
    quote = make_quote(BOOK, Resources(gpus=1, cpu_cores=4), speed, RunShape(total_steps=1000, steps_per_epoch=500, batch_size=1), NOON)
    message = deferral_message(BOOK, quote.cheapest_start, quote, NOON)
    assert "2026-11-23 22:00 UTC (in 10.0 h)" in message
    assert f"saves {usd(quote.saving_usd)}" in message and quote.saving_usd > 0
    without = deferral_message(BOOK, NOON + timedelta(hours=10), None, NOON)
    assert "50% cheaper" in without


def test_an_underused_gpu_run_is_reported_with_the_recommenders_advice(monkeypatch):
    from tasks import run_events

    sent = []
    monkeypatch.setattr(run_events, "emit_run_event", lambda context, name, payload: sent.append((name, payload)))
    context = RunEventContext(flow_run_id="fr", team="default", experiment="e", workload="mnist")
    book = PriceBook.model_validate({"rates": {"gpu_type_hour_usd": {"NVIDIA-A100": 3.0, "NVIDIA-L4": 0.8}}})
    a100 = Resources(gpus=1, gpu_type="NVIDIA-A100", cpu_cores=4)

    def used(gpu):
        return Utilization(cpu_cores_mean=1, cpu_cores_peak=2, memory_peak_gib=1, gpu_util_mean=gpu,
                           gpu_memory_peak_gib=1, samples=10)

    assert run_events.report_utilization(context, book, a100, used(0.9), 3600) is None
    assert run_events.report_utilization(context, book, Resources(cpu_cores=2), used(None), 3600) is None
    payload = run_events.report_utilization(context, book, a100, used(0.25), 3600)
    assert sent == [(GPU_UNDERUTILIZED, payload)]
    assert "NVIDIA-L4" in payload["advice"] and payload["saving_usd"] == pytest.approx(2.2)
    assert "run on CPU" in run_events.report_utilization(context, book, a100, used(0.05), 3600)["advice"]


def test_events_module_has_no_prefect_import_at_module_level():
    """The catalog is read by the CLI, the receiver and docs tooling: importing it must not start Prefect."""
    tree = ast.parse(Path(events_module.__file__).read_text())
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not any("prefect" in (getattr(node, "module", None) or "") for node in top_level)
