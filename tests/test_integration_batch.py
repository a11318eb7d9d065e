"""Batch training: the resume plan on its own, then a real batch killed midway and submitted again."""

from __future__ import annotations

import signal

import psutil
import pytest
from mlflow import MlflowClient
from prefect.client.schemas.objects import StateType

from flows.batch import BatchJob, ChildRun, plan_resume
from oppen.api.batch import get_batch_status, submit_batch_training
from oppen.api.errors import InvalidInput, NotFound, Refused

EXPERIMENT = "batch-resume"


def _child(index: int, attempt: int, state: StateType) -> ChildRun:
    return ChildRun(index, attempt, f"run-{index}-{attempt}", state, state.value.title())


def test_the_resume_plan_skips_completed_jobs_waits_for_live_ones_and_retries_failed_ones():
    children = [
        _child(0, 1, StateType.COMPLETED),
        _child(1, 1, StateType.RUNNING),
        _child(2, 1, StateType.SCHEDULED),
        _child(3, 1, StateType.FAILED), _child(3, 2, StateType.CRASHED),
        _child(4, 1, StateType.CANCELLED),
        _child(5, 1, StateType.FAILED), _child(5, 2, StateType.COMPLETED),
        _child(6, 1, StateType.CRASHED), _child(6, 2, StateType.PENDING),
        _child(9, 1, StateType.COMPLETED),  # beyond the request: ignored
    ]
    plans = plan_resume(8, children)
    assert [(plan.action, plan.attempt) for plan in plans] == [
        ("skip", 1), ("wait", 1), ("wait", 1), ("run", 3), ("run", 2), ("skip", 2), ("wait", 2), ("run", 1),
    ]
    assert plans[0].child.flow_run_id == "run-0-1" and plans[6].child.flow_run_id == "run-6-2"
    assert plans[3].child.flow_run_id == "run-3-2"  # the failed attempt the new one retries
    assert plans[7].child is None
    assert [plan.action for plan in plan_resume(2, [])] == ["run", "run"]


def test_a_batch_is_checked_before_anything_is_created():
    with pytest.raises(InvalidInput, match="batch_id"):
        submit_batch_training([BatchJob(deployment="train-mnist/local")], batch_id="Not A Name")
    with pytest.raises(InvalidInput, match="a batch cannot contain a batch"):
        submit_batch_training([{"deployment": "train-batch/local"}], batch_id="nested")
    with pytest.raises(InvalidInput, match="jobs"):
        submit_batch_training([], batch_id="empty")


def _mnist_job(seed: int) -> BatchJob:
    return BatchJob(deployment="train-mnist/local", name=f"seed-{seed}", parameters={
        "run": {"epochs": 1, "max_steps": 20, "seed": seed}, "experiment": EXPERIMENT, "min_test_accuracy": 0.0,
        "model_name": "batch-cnn",
    })


@pytest.mark.slow
@pytest.mark.integration
def test_unknown_deployments_and_batches_are_not_found(in_process):
    with pytest.raises(NotFound, match="train-mnist/nowhere"):
        submit_batch_training([_mnist_job(0), BatchJob(deployment="train-mnist/nowhere")], batch_id="typo")
    with pytest.raises(InvalidInput, match="job #0"):
        submit_batch_training([BatchJob(deployment="train-mnist/local", parameters={"run": {"epochs": "many"}})],
                              batch_id="bad-parameters")
    with pytest.raises(NotFound, match="typo"):
        get_batch_status("typo")  # nothing was created for it


@pytest.mark.slow
@pytest.mark.integration
def test_a_batch_its_budget_cannot_take_together_is_refused_before_it_starts(in_process, shoestring_team):
    jobs = [BatchJob(deployment="train-mnist/local", parameters={
        "run": {"epochs": 1, "max_steps": 20, "seed": seed}, "cost": {"team": shoestring_team, "max_cost_usd": 0.5}})
        for seed in (0, 1)]
    with pytest.raises(Refused, match="its jobs together are over budget: team shoestring"):
        submit_batch_training(jobs, batch_id="too-dear")
    with pytest.raises(NotFound, match="too-dear"):
        get_batch_status("too-dear")  # no parent, no child: nothing was created


def _processes_of(flow_run_id: str) -> list[psutil.Process]:
    """The worker's process(es) executing this flow run: they carry its id in their environment."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _two_completed_and_one_in_flight():
    status = get_batch_status("resume-me")
    return status if status.completed == 2 and status.jobs[2].status == "running" else None


@pytest.mark.slow
@pytest.mark.integration
def test_a_killed_batch_resumes_without_running_its_completed_jobs_again(in_process):
    jobs = [_mnist_job(seed) for seed in range(4)]
    first = submit_batch_training(jobs, mode="sequential", batch_id="resume-me")
    assert (first.jobs, first.resumed, first.already_completed) == (4, False, 0)
    with pytest.raises(Refused, match=f"batch resume-me is still running as flow run {first.flow_run_id}"):
        submit_batch_training(jobs, batch_id="resume-me")

    # Killed midway: two jobs completed and the third in flight, a child the next parent must adopt.
    midway = in_process.wait_for(_two_completed_and_one_in_flight, 600, "two jobs done and a third started")
    parent = in_process.wait_for(lambda: _processes_of(first.flow_run_id), 30, "the parent flow run's process")
    for process in parent:
        process.send_signal(signal.SIGKILL)
    in_flight_at_kill = midway.jobs[2].flow_run_id
    before = get_batch_status("resume-me")
    completed_before = {job.index: job.flow_run_id for job in before.jobs if job.status == "completed"}
    assert 2 <= len(completed_before) < 4, before  # with jobs left to run
    killed = in_process.final_state(first.flow_run_id, timeout=120)
    assert killed.type == StateType.CRASHED, f"{killed.name}: {killed.message}"

    with pytest.raises(Refused, match="different jobs"):
        submit_batch_training(jobs[:3], batch_id="resume-me")
    again = submit_batch_training(jobs, mode="sequential", batch_id="resume-me")
    assert again.resumed and again.flow_run_id != first.flow_run_id
    assert again.already_completed >= len(completed_before)
    final = in_process.final_state(again.flow_run_id, timeout=600)
    assert final.is_completed(), f"{final.name}: {final.message}\n{in_process.log('worker')}"
    for index, flow_run_id in completed_before.items():
        assert f"#{index} skipped {flow_run_id}" in final.message, final.message

    status = get_batch_status("resume-me")
    assert (status.completed, status.failed, status.in_flight, status.pending, status.running) == (4, 0, 0, 0, False)
    # One child per job: the one in flight at the kill was waited for, not started a second time.
    assert [job.attempts for job in status.jobs] == [1, 1, 1, 1]
    assert [parent.flow_run_id for parent in status.parents] == [first.flow_run_id, again.flow_run_id]
    assert [parent.state for parent in status.parents] == ["Crashed", "Completed"]
    for index, flow_run_id in completed_before.items():
        assert status.jobs[index].flow_run_id == flow_run_id
    assert status.jobs[2].flow_run_id == in_flight_at_kill

    # Each job trained once: one MLflow run per child, and no more runs than jobs.
    mlflow = MlflowClient(in_process.tracking_uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = mlflow.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["prefect.flow_run_id"] for run in runs) == sorted(job.flow_run_id
                                                                                   for job in status.jobs)
    assert {run.data.params["run.seed"] for run in runs} == {"0", "1", "2", "3"}


@pytest.mark.slow
@pytest.mark.integration
def test_a_failed_job_stops_a_sequential_batch_and_not_a_parallel_one(in_process):
    # An unknown team is refused when the batch is submitted (its jobs are quoted up front) ...
    with pytest.raises(NotFound, match="unknown team 'nobody-pays'"):
        submit_batch_training([BatchJob(deployment="train-mnist/local", parameters={"cost": {"team": "nobody-pays"}})],
                              batch_id="nobody-pays")
    # ... a batch larger than the data is only found by the job itself, which ends InvalidRequest.
    too_big = BatchJob(deployment="train-mnist/local", name="too-big", parameters={
        "run": {"epochs": 1, "max_steps": 5, "batch_size": 65536}, "experiment": EXPERIMENT + "-failing"})

    sequential = submit_batch_training([too_big, _mnist_job(7)], batch_id="stops-early")
    state = in_process.final_state(sequential.flow_run_id, timeout=600)
    assert state.is_failed(), f"{state.name}: {state.message}"
    assert "0 completed, 0 skipped, 1 failed, 1 not run" in state.message and "#1 not_run -" in state.message
    status = get_batch_status("stops-early")
    assert [job.status for job in status.jobs] == ["failed", "pending"]

    parallel = submit_batch_training([too_big, _mnist_job(8)], mode="parallel", batch_id="keeps-going")
    state = in_process.final_state(parallel.flow_run_id, timeout=600)
    assert state.is_failed() and "1 completed, 0 skipped, 1 failed, 0 not run" in state.message, state.message
    assert [job.status for job in get_batch_status("keeps-going").jobs] == ["failed", "completed"]
