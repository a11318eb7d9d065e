"""Planning tools through a real Prefect server, worker and MLflow: one tiny MNIST run gives the speed history.

    validate_job_resources    feasible and quoted; too many GPUs for this machine; a budget too small;
                              a GPU-pool job priced differently from its pod; nothing created by any of it
    forecast_training_cost    the finished run with 2 more epochs: about 2 epochs' cost, plus one restart
    compare_training_configs  two batch sizes: the one with history quoted, the other says it has none
    get_gpu_availability      this machine (no kube context here), with the local pool's limits from the server
"""

from __future__ import annotations

import uuid

import pytest

from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound
from oppen.api.comparison import compare_training_configs
from oppen.api.forecasting import forecast_training_cost
from oppen.api.planning import validate_job_resources
from oppen.api.resources import get_gpu_availability
from oppen.cost.budgets import BudgetsFile, apply_budgets
from tests.prefect_api import prefect_api

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SMALL = {"epochs": 1, "max_steps": 30}  # the deployment's own batch size (RunConfig's default, 128)
JOB = {"workload": "mnist", "run": SMALL}


@pytest.fixture(scope="module")
def trained(stack) -> str:
    """One train-mnist/local run through the deployment and the worker: the speed history the quotes come from."""
    from prefect.deployments import run_deployment

    with prefect_api(stack.api_url):
        flow_run = run_deployment("train-mnist/local", parameters={"run": SMALL}, timeout=0, as_subflow=False)
    state = stack.final_state(str(flow_run.id))
    assert state.is_completed(), f"{state.name}: {state.message}\n{stack.log('worker')}"
    return str(flow_run.id)


@pytest.fixture
def no_kube_context(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


@pytest.fixture
def flat_prices(monkeypatch, tmp_path):
    """A price book without an off-peak discount: a price is then proportional to time, whenever the test runs."""
    book = tmp_path / "flat.yaml"
    book.write_text("off_peak: {discount: 0.0}\n")
    monkeypatch.setenv("OPPEN_PRICE_BOOK", str(book))


def _counts() -> tuple[int, int]:
    with context.prefect() as client:
        flow_runs = client.count_flow_runs()
    with context.ledger() as ledger:
        return flow_runs, len(ledger.rows())


def test_the_same_job_is_feasible_and_quoted_from_its_history(in_process, trained, no_kube_context):
    before = _counts()
    verdict = validate_job_resources(JOB)
    assert verdict.feasible and verdict.resources_ok and verdict.fits_budget and verdict.reasons == []
    assert verdict.quoted and verdict.expected_usd > 0 and verdict.p90_usd >= verdict.expected_usd
    assert verdict.expected_seconds > 0 and verdict.cost_per_epoch_usd > 0
    assert verdict.cheapest_start is not None and verdict.saving_usd >= 0
    assert verdict.pool_type == "process" and verdict.work_pool == "local" and verdict.work_queue == "normal"
    assert 0 < verdict.hold_micros and verdict.hold_usd == pytest.approx(verdict.p90_usd, abs=1e-6)
    scopes = {row.scope for row in verdict.budgets}
    assert scopes == {"team default", "experiment default/mnist"} and all(row.fits for row in verdict.budgets)
    assert verdict.summary.startswith("train-mnist/local: feasible; expected $")
    assert _counts() == before  # nothing on the server, nothing in the ledger


def test_more_gpus_than_this_machine_has_is_infeasible_in_one_sentence(in_process, trained):
    verdict = validate_job_resources(JOB | {"cost": {"resources": {"gpus": 4}}})
    assert not verdict.feasible and not verdict.resources_ok and verdict.fits_budget is None and not verdict.quoted
    (reason,) = verdict.reasons
    assert reason.startswith("the run asks for 4 GPU(s) but this machine has 0;") and "\n" not in reason
    assert verdict.resources.gpus == 4


def test_a_budget_too_small_for_the_quote_does_not_fit(in_process, trained):
    with context.ledger() as ledger:
        apply_budgets(ledger, BudgetsFile.model_validate({"teams": {"shoestring": {
            "budget": {"amount_usd": 0.000001, "period": "monthly"}}}}))
    verdict = validate_job_resources(JOB | {"cost": {"team": "shoestring"}})
    assert verdict.quoted and verdict.resources_ok  # same speed key: the team is not part of it
    assert not verdict.feasible and verdict.fits_budget is False
    (reason,) = verdict.reasons
    assert reason.startswith("over budget: team shoestring (monthly) budget $0.000001")
    (row,) = verdict.budgets
    assert not row.fits and row.amount_micros == 1 and row.request_micros == verdict.hold_micros


def test_a_gpu_pool_job_must_be_priced_as_its_pod_is_scheduled(in_process, trained, no_kube_context):
    as_deployed = validate_job_resources({"workload": "mnist", "deployment": "gpu", "run": SMALL})
    assert as_deployed.resources_ok and as_deployed.pool_type == "kubernetes" and as_deployed.cluster is None
    assert as_deployed.resources.gpus == 1 and as_deployed.resources.gpu_type == "NVIDIA-L4"
    assert any("no kube context here" in note for note in as_deployed.notes)
    assert not as_deployed.quoted and any("no speed history" in note for note in as_deployed.notes)
    mispriced = validate_job_resources({"workload": "mnist", "deployment": "gpu", "run": SMALL,
                                        "cost": {"resources": {"gpus": 0}}})
    assert not mispriced.feasible and "priced as gpus=0" in mispriced.reasons[0]


def test_bad_jobs_are_refused_before_anything_is_asked(in_process):
    with pytest.raises(InvalidInput, match="run.epochs"):
        validate_job_resources({"workload": "mnist", "run": {"epochs": 0}})
    with pytest.raises(NotFound, match="no deployment train-mnist/nowhere"):
        validate_job_resources({"workload": "mnist", "deployment": "nowhere"})


def test_two_more_epochs_of_the_finished_run_cost_about_two_epochs(in_process, trained, flat_prices):
    forecast = forecast_training_cost(trained, remaining_epochs=2)
    assert forecast.flow_run_id == trained and forecast.status == "FINISHED" and forecast.workload == "mnist"
    assert forecast.steps_done == 30 and forecast.planned_steps == 30 and forecast.remaining_epochs == 2
    assert forecast.speed_source == "this run's measured steady speed"
    with context.ledger() as ledger:
        (row,) = [row for row in ledger.rows() if row["run_key"] == trained]
    assert forecast.accrued_micros == row["spent_micros"] > 0  # the ledger's exact figure
    assert forecast.additional_usd > 0 and forecast.additional_p90_usd >= forecast.additional_usd
    assert forecast.epochs_usd == pytest.approx(2 * forecast.per_epoch_usd, rel=1e-6)
    # An epoch as the quote prices it from the same speed history.
    quoted = validate_job_resources(JOB)
    # Other tests of the session add runs of this request to its history, which the quote takes its median
    # speed from, while the forecast uses this run's own; on a loaded 2-core machine runs differ by tens of
    # percent, so this only checks both price the same epoch (the arithmetic is unit-tested exactly).
    assert forecast.per_epoch_usd == pytest.approx(quoted.cost_per_epoch_usd, rel=0.5)
    # A run that ended starts again to train more: loading, then the test pass and model logging.
    assert 0 < forecast.overhead_usd < forecast.epochs_usd
    assert forecast.additional_usd == pytest.approx(forecast.epochs_usd + forecast.overhead_usd, rel=1e-6)
    assert forecast.forecast_usd == pytest.approx(forecast.accrued_usd + forecast.additional_usd)
    assert forecast.cap_usd is None and forecast.within_cap is None

    by_mlflow_id = forecast_training_cost(forecast.mlflow_run_id, remaining_epochs=2)
    assert by_mlflow_id.mlflow_run_id == forecast.mlflow_run_id and by_mlflow_id.steps_done == 30
    done = forecast_training_cost(trained)
    assert done.additional_usd == 0 and done.forecast_usd == done.accrued_usd and "nothing left" in done.summary


def test_forecasts_of_runs_that_do_not_exist_are_refused(in_process):
    with pytest.raises(NotFound, match="no MLflow run is tagged with flow run"):
        forecast_training_cost(str(uuid.uuid4()), remaining_epochs=1)
    with pytest.raises(InvalidInput):
        forecast_training_cost("not-a-run")
    with pytest.raises(InvalidInput, match="remaining_epochs"):
        forecast_training_cost(str(uuid.uuid4()), remaining_epochs=-1)


def test_compare_two_batch_sizes_quotes_the_one_with_history(in_process, trained):
    # Batch 96: no other test of the session trains it, so this candidate has no history.
    comparison = compare_training_configs([JOB, {"workload": "mnist", "run": SMALL | {"batch_size": 96}}])
    known, new = comparison.rows
    assert (known.index, new.index) == (1, 2)
    assert known.quoted and known.expected_usd > 0 and known.expected_seconds > 0 and known.fits_budget
    assert known.history_runs >= 1 and known.quality_basis == "same settings"
    assert known.quality_metric == "test_accuracy" and 0 < known.mean_quality <= known.best_quality <= 1
    assert known.cost_per_point_usd > 0 and known.history_mean_cost_usd > 0
    assert known.cheapest and known.fastest and known.best
    assert not new.quoted and new.expected_usd is None and new.cost_per_point_usd is None
    assert new.history_runs == 0 and new.quality_basis is None and "no speed history" in new.note
    assert not (new.cheapest or new.fastest or new.best)
    assert "run.batch_size=96" in new.changes
    assert (comparison.cheapest, comparison.fastest, comparison.best_quality) == (1, 1, 1)
    assert comparison.summary.startswith("1 of 2 candidates quoted; cheapest #1")


def test_compare_refuses_too_few_candidates_and_names_a_bad_one(in_process):
    with pytest.raises(InvalidInput, match="compare 2 to 20 candidate jobs, got 1"):
        compare_training_configs([JOB])
    with pytest.raises(InvalidInput, match="candidate 2: run.batch_size"):
        compare_training_configs([JOB, {"workload": "mnist", "run": {"batch_size": 0}}])


def test_gpu_availability_here_is_this_machine_with_the_local_pools_limits(in_process, no_kube_context):
    found = get_gpu_availability()
    assert found.source == "local" and found.cpu_cores >= 1
    (pool,) = found.pools
    assert pool.pool == "local" and pool.pool_limit is None and pool.can_start is None
    assert {"urgent", "normal", "background"} <= set(pool.queue_limits) and pool.workers_online >= 1
    assert found.gpu_slots is not None and found.gpu_slots.limit == 16
