"""Batch training: several jobs under one parent flow run (`train-batch/local`), resumable by batch id.

Submitting a batch id again after its parent ended (completed, failed, crashed, cancelled) starts a
new parent that skips the jobs already completed, waits for those still in flight, and runs the rest.
"""

from __future__ import annotations

import secrets
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from prefect.exceptions import ObjectNotFound
from prefect.utilities.schema_tools import ValidationError as SchemaError
from prefect.utilities.schema_tools import validate
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flows.batch import (
    BATCH_FLOW, BatchJob, BatchRequest, JobPlan, Mode, batch_tag, child_of, plan_resume, read_batch_runs,
)
from oppen.api import context
from oppen.api.context import prefect
from oppen.api.errors import InvalidInput, NotFound, Refused
from oppen.api.quoting import (
    THRESHOLD_PARAMETER, WORKLOAD_FLOWS, TrainingJob, parse_job, quote_job, resolve, validation_sentence,
)
from oppen.cost.money import to_micros, usd_float
from oppen.cost.policy import check_name

PARENT_DEPLOYMENT = f"{BATCH_FLOW}/local"


class BatchSubmitted(BaseModel):
    """The parent flow run created for a batch."""

    model_config = ConfigDict(frozen=True)

    batch_id: str = Field(description="The batch's id: submit it again to resume the batch.")
    flow_run_id: str = Field(description="The parent flow run (train-batch/local).")
    flow_run_name: str = Field(description="The parent flow run's name.")
    jobs: int = Field(description="Jobs in the batch.")
    mode: Mode = Field(description="sequential or parallel.")
    resumed: bool = Field(description="True when an earlier parent of this batch id exists: this one resumes it.")
    already_completed: int = Field(description="Jobs completed by earlier parents, which this one skips.")
    expected_micros: int = Field(description="The quoted expected cost of the jobs still to run (quoted ones).")
    expected_usd: float
    unquoted_jobs: int = Field(description="Jobs still to run with no quote (no speed history yet, or not training).")


class BatchParentRun(BaseModel):
    """One parent flow run of a batch (one per submission)."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    name: str
    state: str = Field(description="State name: Scheduled, Running, Completed, Failed, Crashed, ...")
    final: bool = Field(description="True once the parent has ended.")
    message: str | None = Field(description="Its final state message: each job's outcome with its flow run id.")
    created: datetime | None


class BatchJobStatus(BaseModel):
    """One job of a batch, from its child flow runs."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="Position of the job in the request, from 0.")
    deployment: str | None = Field(description="The job's deployment (None when no parent's request lists it).")
    name: str | None = Field(description="The job's name, when it was given one.")
    status: str = Field(description="completed, running (scheduled or in flight), failed (its latest attempt "
                                    "failed, crashed or was cancelled; a resubmission runs it again), or pending.")
    attempts: int = Field(description="Child flow runs started for this job so far.")
    flow_run_id: str | None = Field(description="The completed attempt, else the latest one (None when pending).")
    state: str | None = Field(description="That flow run's state name.")
    message: str | None = Field(description="That flow run's state message.")


class BatchStatus(BaseModel):
    """Where a batch stands: its jobs by index and every parent run it has had."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    mode: Mode | None = Field(description="The latest submission's mode.")
    running: bool = Field(description="True while a parent of this batch has not ended.")
    completed: int = Field(description="Jobs completed.")
    failed: int = Field(description="Jobs whose latest attempt failed, crashed or was cancelled.")
    in_flight: int = Field(description="Jobs with an attempt scheduled or running.")
    pending: int = Field(description="Jobs never started.")
    jobs: list[BatchJobStatus]
    parents: list[BatchParentRun] = Field(description="Oldest first.")


# What a parent would do about a job says where it stands (a job to "run" with an earlier attempt: that one failed).
_STATUS = {"skip": "completed", "wait": "running", "run": "failed"}


def submit_batch_training(jobs: Sequence[BatchJob | dict[str, Any]], mode: Mode = "sequential",
                          batch_id: str | None = None, stop_on_failure: bool = True) -> BatchSubmitted:
    """Create the parent flow run of a batch; the same batch id again resumes it (completed jobs are skipped)."""
    request = _request(jobs, mode, batch_id or new_batch_id(), stop_on_failure)
    with prefect() as client:
        runs = read_batch_runs(client, request.batch_id)
        parents = _parents(runs)
        _refuse_a_conflict(request, parents)
        parent_deployment = _deployment(client, PARENT_DEPLOYMENT, "the batch flow")
        admit_batch(client, request)
        children = [child for run in runs if (child := child_of(run))]
        done = {plan.index for plan in plan_resume(len(request.jobs), children) if plan.action != "run"}
        quoted = quote_batch(client, request, skip=done)
        flow_run = client.create_flow_run_from_deployment(
            parent_deployment.id, parameters={"request": request.model_dump(mode="json")},
            name=request.batch_id if not parents else f"{request.batch_id}-resume-{len(parents)}",
            tags=[batch_tag(request.batch_id)],
            # Two submissions racing on one batch id get the same parent instead of two.
            idempotency_key=f"oppen-batch:{request.batch_id}:parent:{len(parents) + 1}",
        )
    skipped = sum(plan.action == "skip" for plan in plan_resume(len(request.jobs), children))
    return BatchSubmitted(batch_id=request.batch_id, flow_run_id=str(flow_run.id), flow_run_name=flow_run.name,
                          jobs=len(request.jobs), mode=request.mode, resumed=bool(parents), already_completed=skipped,
                          expected_micros=quoted.expected_micros, expected_usd=usd_float(quoted.expected_micros),
                          unquoted_jobs=quoted.unquoted)


def admit_batch(client: SyncPrefectClient, request: BatchRequest) -> None:
    """Every check a batch passes before its parent exists: each job names a deployment, with parameters its
    schema accepts. Nothing is created when one fails, so a batch never stops halfway on a typo."""
    deployments: dict[str, DeploymentResponse] = {}
    for index, job in enumerate(request.jobs):
        if job.deployment not in deployments:
            deployments[job.deployment] = _deployment(client, job.deployment, f"job #{index}")
        _check_parameters(index, job, deployments[job.deployment])


@dataclass(frozen=True)
class BatchQuote:
    expected_micros: int
    unquoted: int


def quote_batch(client: SyncPrefectClient, request: BatchRequest, skip: set[int]) -> BatchQuote:
    """Quote the training jobs still to run, and refuse the batch when, together, they cannot fit their budgets.

    Each job is quoted as `oppen train` quotes it (speed history, p90 held at most to its cap, the cap when it
    has no history). The jobs of one team and experiment are added up: a batch that only fits one job at a
    time is refused before its first job starts, not after its third. Nothing is held here; each child still
    reserves for itself when it starts, so jobs queued elsewhere meanwhile are still counted once.
    """
    settings, book = context.settings(), context.price_book()
    needed: dict[tuple[str, str], int] = defaultdict(int)
    expected, unquoted = 0, 0
    with context.ledger(settings) as ledger:
        for index, job in enumerate(request.jobs):
            training = None if index in skip else _as_training_job(job)
            if training is None:
                unquoted += index not in skip
                continue
            resolved = resolve(client, training)
            quoted = quote_job(settings, ledger, book, resolved)
            needed[(resolved.cost.team, resolved.experiment)] += quoted.hold_micros
            if quoted.expected_usd is None:
                unquoted += 1
            else:
                expected += to_micros(quoted.expected_usd)
        over = [f"over budget: {use.describe()}" for (team, experiment), amount in needed.items()
                for use in ledger.budget_uses(team, experiment, amount) if not use.fits]
    if over:
        raise Refused(f"batch {request.batch_id} was not started: its jobs together are {'; '.join(dict.fromkeys(over))}")
    return BatchQuote(expected, unquoted)


def _as_training_job(job: BatchJob) -> TrainingJob | None:
    """A batch job on a training deployment, as `oppen train` would take it; None for other flows."""
    flow, _, deployment = job.deployment.partition("/")
    workload = {flow_name: workload for workload, flow_name in WORKLOAD_FLOWS.items()}.get(flow)
    if workload is None:
        return None
    parameters = job.parameters or {}
    return parse_job({"workload": workload, "deployment": deployment, "config": parameters.get("config") or {},
                      "run": parameters.get("run") or {}, "cost": parameters.get("cost") or {},
                      "experiment": parameters.get("experiment"), "model_name": parameters.get("model_name"),
                      "threshold": parameters.get(THRESHOLD_PARAMETER[workload])})


def get_batch_status(batch_id: str) -> BatchStatus:
    """Each job's latest attempt (or its completed one) and every parent run of the batch."""
    try:
        check_name("batch id", batch_id)
    except ValueError as error:
        raise InvalidInput(str(error)) from None
    with prefect() as client:
        runs = read_batch_runs(client, batch_id)
    if not runs:
        raise NotFound(f"no batch {batch_id!r} on this Prefect server; submit_batch_training starts one")
    parents = _parents(runs)
    request = _request_of(parents[-1]) if parents else None
    children = [child for run in runs if (child := child_of(run))]
    count = max([len(request.jobs) if request else 0] + [child.index + 1 for child in children])
    attempts = {index: sum(child.index == index for child in children) for index in range(count)}
    jobs = [_job_status(plan, request.jobs[plan.index] if request and plan.index < len(request.jobs) else None,
                        attempts[plan.index]) for plan in plan_resume(count, children)]
    summary = {status: sum(job.status == status for job in jobs) for status in ("completed", "failed", "running",
                                                                                 "pending")}
    return BatchStatus(
        batch_id=batch_id, mode=request.mode if request else None,
        running=any(not run.state.is_final() for run in parents if run.state),
        completed=summary["completed"], failed=summary["failed"], in_flight=summary["running"],
        pending=summary["pending"], jobs=jobs, parents=[_parent_run(run) for run in parents],
    )


def new_batch_id() -> str:
    """Sortable by submission time, and unique without asking the server."""
    return f"batch-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def _request(jobs: Sequence[BatchJob | dict[str, Any]], mode: str, batch_id: str,
             stop_on_failure: bool) -> BatchRequest:
    try:
        return BatchRequest.model_validate({"batch_id": batch_id, "jobs": list(jobs), "mode": mode,
                                            "stop_on_failure": stop_on_failure})
    except ValidationError as error:
        raise InvalidInput(validation_sentence(error, "batch")) from None


def _parents(runs: list[FlowRun]) -> list[FlowRun]:
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    return sorted((run for run in runs if child_of(run) is None), key=lambda run: run.created or oldest)


def _refuse_a_conflict(request: BatchRequest, parents: list[FlowRun]) -> None:
    running = [run for run in parents if run.state and not run.state.is_final()]
    if running:
        raise Refused(f"batch {request.batch_id} is still running as flow run {running[-1].id} "
                      f"({running[-1].state.name}); wait for it to end, or cancel it, before resubmitting")
    earlier = _request_of(parents[-1]) if parents else None
    if earlier and _jobs_json(earlier) != _jobs_json(request):
        raise Refused(f"batch {request.batch_id} was submitted before with different jobs; resubmit the same jobs "
                      "to resume it, or give this set of jobs a new batch id")


def _jobs_json(request: BatchRequest) -> list[dict[str, Any]]:
    return [job.model_dump(mode="json") for job in request.jobs]


def _request_of(parent: FlowRun) -> BatchRequest | None:
    try:
        return BatchRequest.model_validate((parent.parameters or {}).get("request"))
    except ValidationError:
        return None  # created by hand with a request this version no longer reads: judged by its children alone


def _deployment(client: SyncPrefectClient, name: str, what: str) -> DeploymentResponse:
    try:
        return client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise NotFound(f"{what} names deployment {name}, which is not on this Prefect server; "
                       "`prefect deployment ls` lists them (deploy with `prefect deploy --all`)") from None


def _check_parameters(index: int, job: BatchJob, deployment: DeploymentResponse) -> None:
    """The check the server makes when the child is created, made now, before any job of the batch runs."""
    schema = deployment.parameter_openapi_schema
    if not deployment.enforce_parameter_schema or not schema:
        return
    try:
        validate((deployment.parameters or {}) | job.parameters, schema, raise_on_error=True)
    except SchemaError as error:
        raise InvalidInput(f"job #{index} ({job.deployment}): {error}") from None


def _job_status(plan: JobPlan, job: BatchJob | None, attempts: int) -> BatchJobStatus:
    child = plan.child
    return BatchJobStatus(
        index=plan.index, deployment=job.deployment if job else None, name=job.name if job else None,
        status=_STATUS[plan.action] if child else "pending", attempts=attempts,
        flow_run_id=child.flow_run_id if child else None, state=child.state_name if child else None,
        message=child.message if child else None,
    )


def _parent_run(run: FlowRun) -> BatchParentRun:
    state = run.state
    return BatchParentRun(flow_run_id=str(run.id), name=run.name, state=state.name if state else "Unknown",
                          final=bool(state and state.is_final()), message=state.message if state else None,
                          created=run.created)
