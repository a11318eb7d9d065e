"""oppen.api's health, report, quota and recommendation tools against the real test server and MLflow.

One tiny training run goes through the `train-mnist/local` deployment and the stack's worker; the
reports are then checked against the ledger it settled into, to the micro-dollar.
"""

from __future__ import annotations

import math
import uuid
from datetime import date, datetime, timedelta, timezone

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from oppen import events
from oppen.api.errors import InvalidInput, NotFound
from oppen.api.health import get_training_health_status
from oppen.api.recommendations import RecommendationOut, recommend_cost_optimization
from oppen.api import reports
from oppen.api.reports import check_training_quota, generate_cost_report, get_resource_utilization_report
from oppen.cost.ledger import Ledger, month_of, utcnow
from oppen.cost.report import build_frame
from oppen.settings import load_settings
from tests.stack import poll_until



def integration(test):
    """Goes through the session's real Prefect server, worker and MLflow."""
    return pytest.mark.slow(pytest.mark.integration(test))


TINY_RUN = {"epochs": 1, "max_steps": 30}


def _components(status) -> dict:
    return {component.name: component for component in status.components}


def _local_worker_online(status) -> bool:
    return any(pool.name == "local" and pool.online_workers for pool in status.pools)


@integration
def test_health_is_healthy_with_the_stack_worker_online(in_process):
    def ready():
        status = get_training_health_status()
        return status if status.healthy and _local_worker_online(status) else None

    status = poll_until(ready, timeout=90, interval=1.0)  # the worker's first heartbeat comes after the server
    assert status, get_training_health_status()
    components = _components(status)
    assert set(components) == {"prefect", "mlflow", "ledger"}
    assert all(component.ok and component.latency_ms is not None for component in components.values())
    assert components["prefect"].version
    local = next(pool for pool in status.pools if pool.name == "local")
    assert local.online_workers >= 1 and local.ok and not local.paused
    assert status.problems == [] and status.late_runs == []


@integration
def test_health_reports_an_unreachable_ledger_without_raising(in_process, monkeypatch):
    from tests.ledger_stress_worker import closed_port_uri

    closed = closed_port_uri().replace("http://", "postgresql+psycopg://postgres@") + "/ledger"
    monkeypatch.setenv("OPPEN_LEDGER_URL", closed)
    status = get_training_health_status()
    components = _components(status)
    assert not components["ledger"].ok and "\n" not in components["ledger"].detail
    assert "OPPEN_LEDGER_URL" in components["ledger"].detail
    assert components["prefect"].ok and components["mlflow"].ok
    assert not status.healthy and any(problem.startswith("ledger is down") for problem in status.problems)


@integration
def test_health_reports_an_unreachable_prefect_and_mlflow_without_raising(in_process, monkeypatch):
    from tests.ledger_stress_worker import closed_port_uri

    monkeypatch.setenv("OPPEN_MLFLOW_TRACKING_URI", closed_port_uri())
    with temporary_settings({PREFECT_API_URL: closed_port_uri() + "/api"}):
        status = get_training_health_status()
    components = _components(status)
    assert not components["prefect"].ok and "did not answer" in components["prefect"].detail
    assert not components["mlflow"].ok and "ConnectError" in components["mlflow"].detail
    assert components["ledger"].ok
    assert not status.healthy and status.pools == [] and len(status.problems) == 2


@integration
def test_an_alert_event_shows_up_newest_first_with_its_figures(in_process):
    flow_run_id = str(uuid.uuid4())
    context = events.RunEventContext(flow_run_id=flow_run_id, team="default", experiment="mnist", workload="mnist")
    events.emit_run_event(context, events.BUDGET_WARNING, {"scope": "team default", "amount_usd": 25.0,
                                                          "used_usd": 18.0, "request_usd": 0.5, "fraction": 0.74})

    def alerted():
        status = get_training_health_status()
        return status if any(alert.flow_run_id == flow_run_id for alert in status.alerts) else None

    status = poll_until(alerted, timeout=30, interval=0.5)
    assert status, "the budget warning never reached the health status"
    alert = next(alert for alert in status.alerts if alert.flow_run_id == flow_run_id)
    assert alert.event == events.BUDGET_WARNING and alert.team == "default" and alert.experiment == "mnist"
    assert alert.summary == "team default budget at 74%: $18.00 used of $25.00, this run asks $0.50"
    assert status.alert_count >= 1 and any("alert(s)" in notice for notice in status.notices)
    assert status.healthy  # an alert needs a person; it does not stop training


@integration
def test_bad_inputs_are_one_sentence_errors(in_process):
    with pytest.raises(InvalidInput, match="failures_since_h"):
        get_training_health_status(failures_since_h=float("nan"))
    with pytest.raises(InvalidInput, match="the range is empty"):
        generate_cost_report(start=date(2030, 1, 2), end=date(2030, 1, 1))
    with pytest.raises(NotFound, match="known teams: .*default"):
        check_training_quota("no-such-team")
    with pytest.raises(InvalidInput, match="neither an MLflow run id"):
        recommend_cost_optimization("not-a-run")


@pytest.fixture(scope="module")
def trained(stack) -> str:
    """One tiny MNIST run through the deployment and the stack's worker; its flow run id."""
    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train-mnist/local")
        # min_test_accuracy 1.0: never registered, so no promotion run follows it onto the worker.
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"run": TINY_RUN, "min_test_accuracy": 1.0})
    state = stack.final_state(str(flow_run.id), timeout=300)
    assert state.is_completed(), f"{state.name}: {state.message}\n{stack.log('worker')}"
    return str(flow_run.id)


def _ledger() -> Ledger:
    """The ledger the API reads (in_process points OPPEN_HOME at the stack's)."""
    return Ledger(load_settings().ledger)


@integration
def test_the_cost_report_matches_the_ledger_to_the_micro_dollar(in_process, trained):
    ledger = _ledger()
    try:
        (row,) = [row for row in ledger.rows(team="default") if row["run_key"] == trained]
        spent_all, _ = ledger.usage("default")
    finally:
        ledger.dispose()
    assert row["spent_micros"] > 0
    report = generate_cost_report(None, None, team="default")
    assert report.total_micros == spent_all  # every default-team run of this session is today's
    assert report.total_usd == report.total_micros / 1_000_000
    mnist = next(scope for scope in report.by_scope if scope.experiment == "mnist")
    assert mnist.actual_micros >= row["spent_micros"] and mnist.quote_micros > 0
    assert mnist.mean_cost_per_point_usd is not None and mnist.mean_cost_per_point_usd > 0
    assert {budget.experiment for budget in report.budgets} >= {None, "mnist"}
    only_mnist = generate_cost_report(None, None, team="default", experiment="mnist")
    assert only_mnist.total_micros == mnist.actual_micros
    assert {budget.experiment for budget in only_mnist.budgets} == {None, "mnist"}


@integration
def test_the_reports_cost_per_point_is_the_one_the_run_logged_to_mlflow(in_process, trained):
    ledger = _ledger()
    try:
        rows = ledger.rows(team="default", experiment="mnist")
    finally:
        ledger.dispose()
    (row,) = [row for row in rows if row["run_key"] == trained]
    logged = MlflowClient(in_process.tracking_uri).get_run(row["mlflow_run_id"]).data.metrics["cost/per_point_usd"]
    metric, _, per_point = reports.ledger_quality(row)  # from the ledger alone: not None, MLflow is not asked
    assert metric == "test_accuracy" and math.isclose(per_point, logged, rel_tol=1e-9)
    # The scope's mean is the one the MLflow lookup (the cost-report flow's source) gives, run for run.
    from_mlflow = build_frame(rows, reports.quality_of(MlflowClient(in_process.tracking_uri),
                                                       [r["mlflow_run_id"] for r in rows]))
    report = generate_cost_report(None, None, team="default", experiment="mnist")
    (mnist,) = report.by_scope
    assert math.isclose(mnist.mean_cost_per_point_usd, from_mlflow["cost_per_point_usd"].mean(), rel_tol=1e-9)


@integration
def test_the_utilization_report_lists_the_run_with_its_idle_money(in_process, trained):
    report = get_resource_utilization_report(team="default")
    (run,) = [run for run in report.runs if run.flow_run_id == trained]
    assert run.workload == "mnist" and run.billed_device == "cpu" and run.gpus == 0
    assert run.cpu_cores_mean is not None and run.memory_peak_gib and run.memory_peak_gib > 0
    assert run.cost_micros > 0 and run.utilization is not None
    assert run.idle_micros == round(run.cost_micros * (1 - run.utilization))
    (team,) = [team for team in report.by_team if team.team == "default"]
    assert team.cost_micros == sum(r.cost_micros for r in report.runs if r.team == "default")
    ledger = _ledger()
    try:
        (row,) = [row for row in ledger.rows(team="default") if row["run_key"] == trained]
    finally:
        ledger.dispose()
    assert run.cost_micros == row["spent_micros"] and run.mlflow_run_id == row["mlflow_run_id"]


@integration
def test_the_quota_reflects_the_spend(in_process, trained):
    quota = check_training_quota("default")
    ledger = _ledger()
    try:
        spent, held = ledger.usage("default", None, month_of(utcnow()))
    finally:
        ledger.dispose()
    team_wide = next(budget for budget in quota.budgets if budget.experiment is None)
    assert team_wide.period == "monthly" and team_wide.spent_micros == spent and team_wide.held_micros == held
    assert team_wide.spent_micros > 0 and team_wide.remaining_micros == team_wide.limit_micros - team_wide.used_micros
    assert 0 < team_wide.fraction_used < 1 and team_wide.state == "ok"
    assert any(budget.experiment == "mnist" and budget.spent_micros > 0 for budget in quota.budgets)
    assert quota.tightest is not None


@integration
def test_recommendations_for_the_run_by_either_id_and_not_found_for_unknown_ones(in_process, trained):
    client = MlflowClient(in_process.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (mlflow_run,) = client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run_id` = '{trained}'")
    by_mlflow_id = recommend_cost_optimization(mlflow_run.info.run_id)
    assert isinstance(by_mlflow_id, list)
    assert all(isinstance(item, RecommendationOut) and item.mlflow_run_id == mlflow_run.info.run_id
               for item in by_mlflow_id)
    assert [item.saving_usd for item in by_mlflow_id] == sorted((item.saving_usd for item in by_mlflow_id), reverse=True)
    assert recommend_cost_optimization(trained) == by_mlflow_id
    with pytest.raises(NotFound, match="no MLflow run"):
        recommend_cost_optimization(uuid.uuid4().hex)
    with pytest.raises(NotFound, match="no MLflow run is tagged"):
        recommend_cost_optimization(str(uuid.uuid4()))


@integration
def test_health_after_the_run_is_still_healthy_with_no_failures(in_process, trained):
    status = get_training_health_status()
    assert status.healthy, status.problems
    assert trained not in {failure.flow_run_id for failure in status.failures}


# --- without a server: the cost report prices runs from the ledger's settlement detail ----------------


class NoMlflow:
    def __getattr__(self, name):
        raise AssertionError(f"MLflow was asked ({name}) for a run the ledger can price")


def _settled_run(ledger: Ledger, micros: int, detail: dict | None, when: datetime) -> str:
    run_key, mlflow_run_id = str(uuid.uuid4()), uuid.uuid4().hex
    attempt = f"{run_key}:1"
    ledger.reserve(team="default", experiment="mnist", run_key=run_key, attempt_id=attempt, quote_micros=micros,
                   hold_micros=2 * micros, hold_for=timedelta(hours=1), workload="mnist",
                   mlflow_run_id=mlflow_run_id, now=when)
    ledger.settle(attempt, charges_by_month={month_of(when): micros}, mlflow_run_id=mlflow_run_id,
                  detail=detail, now=when + timedelta(minutes=5))
    return mlflow_run_id


def test_the_cost_report_needs_no_mlflow_for_runs_settled_with_their_metric(tmp_path, monkeypatch):
    monkeypatch.setenv("OPPEN_HOME", str(tmp_path))
    monkeypatch.delenv("OPPEN_LEDGER_URL", raising=False)
    monkeypatch.delenv("OPPEN_BUDGETS_FILE", raising=False)
    monkeypatch.setattr(reports.context, "mlflow", lambda *args: NoMlflow())
    start = datetime(2026, 3, 2, 9, tzinfo=timezone.utc)
    with reports.context.ledger() as ledger:
        settled = [(123_457, 0.91), (150_001, 0.92), (200_003, 0.935)]  # dearer points each run: degrading
        for hour, (micros, accuracy) in enumerate(settled):
            _settled_run(ledger, micros, {"gpu_hours": 0.0, "cpu_hours": 0.01, "metric": "test_accuracy",
                                          "value": accuracy, "attempt": 1}, start + timedelta(hours=hour))
        _settled_run(ledger, 50_000, {"gpu_hours": 0.0, "cpu_hours": 0.01, "metric": None, "value": None,
                                      "attempt": 1}, start + timedelta(hours=4))  # failed before its test pass
        report = reports.generate_cost_report(date(2026, 3, 2), date(2026, 3, 2), team="default")
        (mnist,) = report.by_scope
        assert report.runs == mnist.runs == 4 and report.total_micros == 123_457 + 150_001 + 200_003 + 50_000
        # As settlement works it out: the run's total in dollars over the accuracy's percentage points.
        expected = [micros / 1e6 / (accuracy * 100) for micros, accuracy in settled]
        assert math.isclose(mnist.mean_cost_per_point_usd, sum(expected) / 3, rel_tol=1e-12)
        assert report.trend == "degrading"

        # A run booked by an older version (no metric in its detail) is the only one MLflow is asked about.
        older = _settled_run(ledger, 80_000, None, start + timedelta(hours=5))
        asked = []
        monkeypatch.setattr(reports, "quality_of", lambda client, run_ids: asked.extend(run_ids) or {})
        reports.generate_cost_report(date(2026, 3, 2), date(2026, 3, 2), team="default")
        assert asked == [older]
