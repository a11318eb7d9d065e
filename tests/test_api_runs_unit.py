"""The pure parts of the experiment, status and cost tools: grouping, quality metrics, progress, ledger figures."""

from __future__ import annotations

from datetime import timedelta

import pytest
from mlflow.entities import Metric, Param, Run, RunData, RunInfo, RunTag

from oppen.api.experiments import booked_per_experiment, group_metrics, quality_metric_of
from oppen.api.run_cost import ledger_run, run_cost_of
from oppen.api.status import progress_of
from oppen.cost.budgets import BudgetsFile, apply_budgets
from oppen.cost.ledger import Ledger
from oppen.cost.money import to_micros


def _run(metrics: dict[str, float] | None = None, params: dict[str, str] | None = None,
         tags: dict[str, str] | None = None) -> Run:
    info = RunInfo(run_id="a" * 32, experiment_id="1", user_id="", status="RUNNING", start_time=0, end_time=None,
                   lifecycle_stage="active")
    data = RunData(metrics=[Metric(key, value, 0, 0) for key, value in (metrics or {}).items()],
                   params=[Param(key, value) for key, value in (params or {}).items()],
                   tags=[RunTag(key, value) for key, value in (tags or {}).items()])
    return Run(info, data)


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.create_schema()
    apply_budgets(ledger, BudgetsFile.model_validate({"teams": {"ml": {"budget": {"amount_usd": 1.0, "period": "total"}}}}))
    yield ledger
    ledger.dispose()


def _reserve(ledger: Ledger, key: str, usd: float, experiment: str = "mnist", **extra):
    micros = to_micros(usd)
    return ledger.reserve(team="ml", experiment=experiment, run_key=key, attempt_id=f"{key}#1", quote_micros=micros,
                          hold_micros=micros, hold_for=timedelta(hours=1), workload="mnist", **extra)


def test_metrics_are_grouped_by_what_they_measure():
    groups = group_metrics({
        "cost/total_usd": 0.1, "cost/gpu_hours": 0.0, "cost/spot_lost_usd": 0.0, "speed/seconds_per_sample": 1e-4,
        "train/loss": 0.3, "train/epoch": 1, "train/samples_per_second": 900.0, "val/accuracy": 0.9,
        "test/accuracy": 0.95, "eval/perplexity": 40.0, "utilization/cpu_cores_mean": 1.5,
        "system/cpu_utilization_percentage": 80.0, "custom": 1.0,
    })
    assert set(groups.cost) == {"cost/total_usd", "cost/gpu_hours", "cost/spot_lost_usd", "speed/seconds_per_sample"}
    assert set(groups.train) == {"train/loss", "train/epoch", "train/samples_per_second"}
    assert set(groups.validation) == {"val/accuracy"} and set(groups.test) == {"test/accuracy", "eval/perplexity"}
    assert set(groups.system) == {"utilization/cpu_cores_mean", "system/cpu_utilization_percentage"}
    assert groups.other == {"custom": 1.0}


def test_the_quality_metric_follows_the_workload_else_what_was_logged():
    assert quality_metric_of(_run(tags={"oppen.workload": "mnist"})) == ("test_accuracy", True)
    assert quality_metric_of(_run(tags={"oppen.workload": "lm"})) == ("eval_perplexity", False)
    assert quality_metric_of(_run(metrics={"eval/perplexity": 30.0})) == ("eval_perplexity", False)
    assert quality_metric_of(_run()) == (None, None)


def test_progress_takes_the_furthest_step_mlflow_or_the_progress_artifact_knows():
    run = _run(metrics={"train/epoch": 1, "train/loss": 0.2},
               params={"run.epochs": "2", "run.max_steps": "600", "shape.steps_per_epoch": "429"})
    history = {"train/epoch": [Metric("train/epoch", 1, 0, 429)],
               "cost/accrued_usd": [Metric("cost/accrued_usd", 0.1, 0, 400), Metric("cost/accrued_usd", 0.2, 0, 429)]}
    from_mlflow = progress_of(run, history, {}, percent=None)
    assert (from_mlflow.step, from_mlflow.total_steps, from_mlflow.total_epochs) == (429, 600, 2)
    assert from_mlflow.epochs_completed == 1 and from_mlflow.source == "mlflow" and from_mlflow.train_loss == 0.2
    later = progress_of(run, history, {}, percent=90.0)  # the artifact moves every few seconds, MLflow per epoch
    assert later.step == 540 and later.source == "prefect-artifact" and later.fraction == pytest.approx(0.9)
    queued = progress_of(None, {}, {"run": {"epochs": 3}}, percent=None)
    assert (queued.step, queued.total_steps, queued.total_epochs, queued.source) == (0, None, 3, "none")


def test_ledger_figures_per_experiment_match_the_ledgers_own_usage(ledger):
    first = _reserve(ledger, "run-1", 0.6)
    ledger.settle(first.attempt_id, charges_by_month={"2026-11": 300_000})
    _reserve(ledger, "run-2", 0.2)  # still running: holds 0.2
    assert not _reserve(ledger, "run-3", 0.6).accepted  # 0.3 spent + 0.2 held + 0.6 > 1.0
    ledger.hold_queued(team="ml", experiment="mnist", run_key="run-4", hold_micros=100_000, hold_for=timedelta(hours=1))
    lm = _reserve(ledger, "run-5", 0.05, experiment="lm")
    ledger.settle(lm.attempt_id, charges_by_month={"2026-11": 50_000})

    booked = booked_per_experiment(ledger, ["mnist", "lm", "empty"])
    mnist = booked["mnist"]
    assert (mnist.runs, mnist.running, mnist.refused, mnist.queued) == (3, 1, 1, 1)
    assert (mnist.spent, mnist.held) == ledger.usage("ml", "mnist") == (300_000, 300_000)
    assert (booked["lm"].runs, booked["lm"].spent, booked["lm"].held) == (1, 50_000, 0)
    assert "empty" not in booked


def test_a_runs_cost_from_the_ledger_alone(ledger):
    reservation = _reserve(ledger, "run-1", 0.4, cap_micros=500_000, mlflow_run_id="b" * 32)
    ledger.settle(reservation.attempt_id, charges_by_month={"2026-10": 100_000, "2026-11": 23_456})
    booked = ledger_run(ledger, mlflow_run_id="b" * 32)
    assert booked == ledger_run(ledger, run_key="run-1") and ledger_run(ledger, run_key="nope") is None
    cost = run_cost_of("run-1", booked, None, ledger.attempts_of("run-1"), ledger.charges_of("run-1"), None, [])
    assert cost.status == "settled" and cost.spent_micros == 123_456 and cost.spent_usd == 0.123456
    assert cost.cap_micros == 500_000 and cost.quote_micros == 400_000 and cost.held_micros == 0
    assert [(c.month, c.amount_micros) for c in cost.charges] == [("2026-10", 100_000), ("2026-11", 23_456)]
    assert cost.agrees_with_ledger is None  # no MLflow figure to compare
    assert cost.summary == "settled: $0.123456 spent of a $0.50 cap; quoted $0.40; 1 attempt"


def test_a_runs_utilization_comes_from_its_settlement_in_the_ledger(ledger):
    from oppen.api.reports import ledger_utilization

    booked = _reserve(ledger, "run-1", 0.4, mlflow_run_id="c" * 32)
    ledger.settle(booked.attempt_id, charges_by_month={"2026-12": 100_000}, mlflow_run_id="c" * 32, detail={
        "attempt": 1, "seconds": 12.5, "resources": {"gpus": 0, "gpu_type": None, "cpu_cores": 2.0, "memory_gib": 0.0},
        "utilization": {"utilization/cpu_cores_mean": 1.5, "utilization/cpu_cores_peak": 1.9,
                        "utilization/memory_peak_gib": 0.8}})
    older = _reserve(ledger, "run-2", 0.4, mlflow_run_id="d" * 32)
    ledger.settle(older.attempt_id, charges_by_month={"2026-12": 50_000}, mlflow_run_id="d" * 32,
                  detail={"attempt": 1, "gpu_hours": 0.0})  # booked before the ledger kept utilisation
    rows = {row["run_key"]: row for row in ledger.rows()}
    run = ledger_utilization(rows["run-1"])
    assert (run.status, run.seconds, run.cpu_cores, run.cpu_cores_mean, run.billed_device) == ("FINISHED", 12.5, 2.0, 1.5, "cpu")
    assert run.utilization == 0.75 and run.cost_micros == 100_000 and run.idle_micros == 25_000
    assert (run.flow_run_id, run.team, run.experiment, run.workload) == ("run-1", "ml", "mnist", "mnist")
    assert ledger_utilization(rows["run-2"]) is None  # MLflow is asked for this one
