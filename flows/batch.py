"""The batch flow: several training jobs as child flow runs of one parent, resumable by batch id.

Each job runs through its own deployment (`run_deployment(..., as_subflow=True)`), so it is quoted,
budget-checked and metered by its training flow as any other run. Children carry the batch's tags
and a deterministic idempotency key (batch, job index, attempt): a parent re-run with the same batch
id reads what earlier parents left and skips a completed job, waits for one still in flight instead
of starting it twice, and starts a failed, crashed or cancelled one again as its next attempt.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments import run_deployment
from prefect.states import Completed, Failed, State
from pydantic import BaseModel, ConfigDict, Field, field_validator

from oppen.cost.policy import NAME_PATTERN

BATCH_FLOW = "train-batch"
MAX_JOBS = 100  # one parent polls its children; past this, split the work into several batches
# A child lasts tens of seconds at the least (a process start, then training); polling faster only loads the server.
POLL_SECONDS = 2.0
_PAGE = 200  # the server's default page size for flow runs

Mode = Literal["sequential", "parallel"]
Action = Literal["skip", "wait", "run"]
Outcome = Literal["completed", "skipped", "failed", "not_run"]


class BatchJob(BaseModel):
    """One job of a batch: a deployment and the flow parameters its child flow run gets."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    deployment: str = Field(pattern=r"^[^/\s]+/[^/\s]+$", max_length=200,
                            description="FLOW/DEPLOYMENT, e.g. train-mnist/local.")
    parameters: dict[str, Any] = Field(default_factory=dict,
                                       description="Flow parameters, merged over the deployment's own.")
    name: str | None = Field(None, min_length=1, max_length=120,
                             description="Child flow run name (default: BATCH_ID-INDEX).")

    @field_validator("deployment")
    @classmethod
    def _not_a_batch(cls, value: str) -> str:
        if value.split("/", 1)[0] == BATCH_FLOW:
            raise ValueError(f"a batch cannot contain a batch ({value}); list its jobs instead")
        return value


class BatchRequest(BaseModel):
    """A batch: its id (the key that makes a re-run resume it), its jobs, and how to run them."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    batch_id: str = Field(pattern=NAME_PATTERN, description="Lowercase letters, digits, '.', '_' or '-' (1-63 chars).")
    jobs: list[BatchJob] = Field(min_length=1, max_length=MAX_JOBS, description="Run in this order when sequential.")
    mode: Mode = Field("sequential", description="sequential: one at a time, in order; parallel: all at once.")
    stop_on_failure: bool = Field(True, description="Sequential only: leave the jobs after a failed one unrun.")


# Tags every flow run of a batch carries; children also carry their job index and attempt.
def batch_tag(batch_id: str) -> str:
    return f"oppen.batch:{batch_id}"


_JOB_TAG = "oppen.batch.job:"
_ATTEMPT_TAG = "oppen.batch.attempt:"


def child_tags(batch_id: str, index: int, attempt: int) -> list[str]:
    return [batch_tag(batch_id), f"{_JOB_TAG}{index}", f"{_ATTEMPT_TAG}{attempt}"]


def idempotency_key(batch_id: str, index: int, attempt: int) -> str:
    """Two parents starting the same attempt of the same job get one flow run between them."""
    return f"oppen-batch:{batch_id}:{index}:{attempt}"


@dataclass(frozen=True)
class ChildRun:
    """One attempt of one job, as the server holds it."""

    index: int
    attempt: int
    flow_run_id: str
    state_type: StateType | None
    state_name: str
    message: str | None = None

    @property
    def completed(self) -> bool:
        return self.state_type == StateType.COMPLETED

    @property
    def in_flight(self) -> bool:
        return self.state_type not in (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)


@dataclass(frozen=True)
class JobPlan:
    """What a parent does about one job: skip it (completed earlier), wait for it, or run it."""

    index: int
    action: Action
    attempt: int  # the attempt skipped or waited for, or the one to start
    child: ChildRun | None  # the earlier child behind a skip or a wait, or the failed attempt a run retries


def plan_resume(job_count: int, children: Iterable[ChildRun]) -> list[JobPlan]:
    """Per job: a completed attempt is never run again; one still in flight is waited for, never doubled;
    otherwise (never started, or every attempt failed, crashed or was cancelled) the next attempt runs."""
    attempts: dict[int, list[ChildRun]] = defaultdict(list)
    for child in children:
        attempts[child.index].append(child)
    plans = []
    for index in range(job_count):
        earlier = sorted(attempts[index], key=lambda child: child.attempt)
        completed = next((child for child in earlier if child.completed), None)
        in_flight = [child for child in earlier if child.in_flight]
        if completed:
            plans.append(JobPlan(index, "skip", completed.attempt, completed))
        elif in_flight:
            plans.append(JobPlan(index, "wait", in_flight[-1].attempt, in_flight[-1]))
        else:
            latest = earlier[-1] if earlier else None
            plans.append(JobPlan(index, "run", latest.attempt + 1 if latest else 1, latest))
    return plans


def read_batch_runs(client: SyncPrefectClient, batch_id: str) -> list[FlowRun]:
    """Every flow run tagged with the batch: its parents and all attempts of its children."""
    runs: list[FlowRun] = []
    while True:
        page = client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[batch_tag(batch_id)])),
                                     sort=FlowRunSort.ID_DESC, limit=_PAGE, offset=len(runs))
        runs += page
        if len(page) < _PAGE:
            return runs


def child_of(flow_run: FlowRun) -> ChildRun | None:
    """The child a flow run is, from its tags; None for a parent."""
    index, attempt = _tag_number(flow_run.tags, _JOB_TAG), _tag_number(flow_run.tags, _ATTEMPT_TAG)
    if index is None or attempt is None:
        return None
    state = flow_run.state
    return ChildRun(index, attempt, str(flow_run.id), state.type if state else None, state.name if state else "Unknown",
                    state.message if state else None)


def _tag_number(tags: list[str], prefix: str) -> int | None:
    for tag in tags:
        if tag.startswith(prefix) and tag[len(prefix):].isdigit():
            return int(tag[len(prefix):])
    return None


class JobOutcome(BaseModel):
    """How one job of the batch ended in this parent run."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="Position of the job in the request, from 0.")
    deployment: str = Field(description="The job's deployment.")
    name: str | None = Field(description="The job's name, when it was given one.")
    action: Action = Field(description="skip: completed by an earlier parent; wait: adopted from an earlier parent "
                                       "while still in flight; run: started by this parent.")
    outcome: Outcome = Field(description="completed (here), skipped (completed earlier, not run again), failed, "
                                         "or not_run (a sequential batch stopped at an earlier failure).")
    flow_run_id: str | None = Field(description="The child flow run (None when not run).")
    attempt: int | None = Field(description="Which attempt of this job the child is, from 1.")
    state: str | None = Field(description="The child's final state name (Completed, OverBudget, Crashed, ...).")
    message: str | None = Field(None, description="The child's final state message when it did not complete.")

    def line(self) -> str:
        ended = f" ({self.state})" if self.state and self.state != "Completed" else ""
        return f"#{self.index} {self.outcome} {self.flow_run_id or '-'}{ended}"


class BatchResult(BaseModel):
    """What one parent run of a batch did, job by job."""

    model_config = ConfigDict(frozen=True)

    batch_id: str
    mode: Mode
    jobs: list[JobOutcome]

    def count(self, outcome: Outcome) -> int:
        return sum(job.outcome == outcome for job in self.jobs)

    @property
    def succeeded(self) -> bool:
        return all(job.outcome in ("completed", "skipped") for job in self.jobs)

    def message(self) -> str:
        counts = ", ".join(f"{self.count(outcome)} {outcome.replace('_', ' ')}"
                           for outcome in ("completed", "skipped", "failed", "not_run"))
        return f"batch {self.batch_id}: {len(self.jobs)} jobs, {counts}; " + "; ".join(job.line() for job in self.jobs)


class _BatchRun:
    """One parent run: starts its children through their deployments and waits for them."""

    def __init__(self, client: SyncPrefectClient, request: BatchRequest) -> None:
        self.client, self.request = client, request
        self.logger = get_run_logger()

    def run(self, plans: list[JobPlan]) -> list[JobOutcome]:
        return self._sequential(plans) if self.request.mode == "sequential" else self._parallel(plans)

    def _sequential(self, plans: list[JobPlan]) -> list[JobOutcome]:
        outcomes: list[JobOutcome] = []
        stopped_at: int | None = None
        for plan in plans:
            if stopped_at is not None:
                outcomes.append(self._outcome(plan, "not_run", None))
                continue
            if plan.action == "skip":
                outcomes.append(self._outcome(plan, "skipped", plan.child))
                continue
            flow_run_id = self._child_id(plan)
            outcome = self._finished(plan, self._wait([flow_run_id])[flow_run_id])
            outcomes.append(outcome)
            if outcome.outcome == "failed" and self.request.stop_on_failure:
                stopped_at = plan.index
                self.logger.warning("job #%d failed (%s); the jobs after it are not run", plan.index, outcome.state)
        return outcomes

    def _parallel(self, plans: list[JobPlan]) -> list[JobOutcome]:
        started = {plan.index: self._child_id(plan) for plan in plans if plan.action != "skip"}
        finished = self._wait(list(started.values()))
        return [self._outcome(plan, "skipped", plan.child) if plan.action == "skip"
                else self._finished(plan, finished[started[plan.index]]) for plan in plans]

    def _child_id(self, plan: JobPlan) -> str:
        """The flow run to wait for: the earlier parent's child still in flight, or a new attempt."""
        if plan.action == "wait":
            self.logger.info("job #%d: waiting for %s, started by an earlier run of this batch", plan.index,
                             plan.child.flow_run_id)
            return plan.child.flow_run_id
        job, batch_id = self.request.jobs[plan.index], self.request.batch_id
        name = job.name or f"{batch_id}-{plan.index}"
        child = run_deployment(
            job.deployment, parameters=job.parameters, timeout=0, as_subflow=True,
            flow_run_name=name if plan.attempt == 1 else f"{name}-attempt-{plan.attempt}",
            tags=child_tags(batch_id, plan.index, plan.attempt),
            idempotency_key=idempotency_key(batch_id, plan.index, plan.attempt),
        )
        self.logger.info("job #%d: started %s (%s, attempt %d)", plan.index, child.id, job.deployment, plan.attempt)
        return str(child.id)

    def _wait(self, flow_run_ids: list[str]) -> dict[str, FlowRun]:
        """Poll until every one of these flow runs is in a final state."""
        finished: dict[str, FlowRun] = {}
        while pending := [flow_run_id for flow_run_id in flow_run_ids if flow_run_id not in finished]:
            runs = self.client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=pending)),
                                              limit=len(pending))
            finished |= {str(run.id): run for run in runs if run.state and run.state.is_final()}
            if len(finished) < len(flow_run_ids):
                time.sleep(POLL_SECONDS)
        return finished

    def _finished(self, plan: JobPlan, flow_run: FlowRun) -> JobOutcome:
        child = child_of(flow_run)
        outcome = self._outcome(plan, "completed" if child.completed else "failed", child)
        self.logger.info("job #%d: %s", plan.index, outcome.line())
        return outcome

    def _outcome(self, plan: JobPlan, outcome: Outcome, child: ChildRun | None) -> JobOutcome:
        job = self.request.jobs[plan.index]
        return JobOutcome(
            index=plan.index, deployment=job.deployment, name=job.name, action=plan.action, outcome=outcome,
            flow_run_id=child.flow_run_id if child else None, attempt=child.attempt if child else None,
            state=child.state_name if child else None,
            message=child.message if child and not child.completed else None,
        )


def _artifact_key(batch_id: str) -> str:
    return "batch-" + re.sub(r"[^a-z0-9-]", "-", batch_id)  # artifact keys: lowercase letters, digits, dashes


# Persisted: if the final state is retried, the server's copy comes back, and only a stored result survives.
@flow(name=BATCH_FLOW, log_prints=True, validate_parameters=True, persist_result=True)
def train_batch(request: BatchRequest) -> State:
    """Run each job through its deployment as a child flow run; a re-run of the same batch id resumes it."""
    with get_client(sync_client=True) as client:
        children = [child for run in read_batch_runs(client, request.batch_id) if (child := child_of(run))]
        plans = plan_resume(len(request.jobs), children)
        skipped = sum(plan.action == "skip" for plan in plans)
        if skipped:
            get_run_logger().info("batch %s: %d of %d jobs completed earlier and are skipped", request.batch_id,
                                  skipped, len(plans))
        result = BatchResult(batch_id=request.batch_id, mode=request.mode, jobs=_BatchRun(client, request).run(plans))
    create_table_artifact([job.model_dump(mode="json") for job in result.jobs], key=_artifact_key(request.batch_id),
                          description=result.message()[:500])
    return (Completed if result.succeeded else Failed)(message=result.message(), data=result)
