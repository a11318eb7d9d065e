"""Queue, trigger and cancel training jobs: each quoted, checked against its budgets and held before it exists.

    queue_training_job(job, priority)  check pool, queue, job variables → quote → refuse when over budget
                                       → create the flow run in the priority's queue → hold its quote
    trigger_training(...)              the same, in the `normal` queue unless told otherwise
    cancel_training_job(id, reason)    cancel the flow run, release its queue hold, record why

The hold is what keeps a queue honest: ten runs quoted against the same last $10 cannot all be
queued. A run that starts takes its hold over in the ledger (never counted twice), and one that is
cancelled, or never starts, costs nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from prefect.exceptions import PrefectHTTPStatusError
from prefect.states import Cancelled, Cancelling, StateType
from pydantic import BaseModel, ConfigDict, Field

from oppen.api import context
from oppen.api.errors import InvalidInput, Refused
from oppen.api.queue_status import position_of
from oppen.api.quoting import JobQuote, Priority, ResolvedJob, TrainingJob, parse_job, quote_job, resolve
from oppen.cost.money import format_usd, to_micros, usd_float
from oppen.cost.queue_holds import HELD
from work_pools.job_variables import check_request
from work_pools.spec import load_pools

QUEUED_TAG = "oppen.queued"
# A queued run's hold lasts through a day of waiting (a background run deferred to the off-peak window
# waits up to 16 hours) plus three times its p90 duration; past that it lapses, charging nothing.
QUEUE_WAIT = timedelta(hours=24)


class QueuedJob(BaseModel):
    """A job created in a queue: its flow run, where it stands, what it is expected to cost and what it holds."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    flow_run_name: str
    deployment: str
    queue: str
    state: str
    position: int | None = Field(description="1 is next to start; None once it started, or when it is scheduled later.")
    eta: datetime | None = Field(description="Expected start (UTC); a lower bound when a run ahead has no quote.")
    quote: JobQuote
    held_micros: int = Field(description="What its queue hold keeps of its budgets until it starts.")
    held_usd: float
    prefect_url: str | None


class CancelledJob(BaseModel):
    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    previous_state: str
    state: str = Field(description="Cancelled, or Cancelling for a run the worker is stopping.")
    reason: str
    released_micros: int = Field(description="The queue hold released (0 when the run had started: its own "
                                 "reservation settles what it spent when it stops).")
    released_usd: float


def queue_training_job(job: TrainingJob | dict, priority: Priority = "normal",
                       job_variables: dict[str, Any] | None = None) -> QueuedJob:
    """Quote the job, refuse it when it does not fit its budgets, else create it in the priority's queue and hold."""
    job = parse_job(job)
    if priority not in ("urgent", "normal", "background"):
        raise InvalidInput(f"priority {priority!r} is not one of urgent, normal, background")
    settings, book = context.settings(), context.price_book()
    with context.prefect() as client:
        resolved = resolve(client, job)
        variables = resolved.job_variables | (job_variables or {})
        _check_pool(resolved, priority, variables)
        with context.ledger(settings) as ledger:
            quoted = quote_job(settings, ledger, book, resolved)
            if not quoted.fits:
                raise Refused(f"{job.deployment_name} was not queued: {'; '.join(quoted.reasons)}")
            flow_run = _create(client, resolved, priority, job_variables)
            hold = ledger.hold_queued(
                team=resolved.cost.team, experiment=resolved.experiment, run_key=str(flow_run.id),
                hold_micros=quoted.hold_micros, quote_micros=to_micros(quoted.expected_usd) if quoted.quote else None,
                expected_seconds=quoted.expected_seconds, hold_for=_hold_for(quoted), workload=job.workload,
                queue=priority,
            )
            if hold.status not in (HELD, "started"):  # another job took the room between the quote and the hold
                client.set_flow_run_state(flow_run.id, Cancelled(message=f"refused when queued: {hold.reason}"),
                                          force=True)
                raise Refused(f"{job.deployment_name} was not queued: {hold.reason}")
        position, eta = position_of(client, str(flow_run.id))
        flow_run = client.read_flow_run(flow_run.id)
    return QueuedJob(
        flow_run_id=str(flow_run.id), flow_run_name=flow_run.name, deployment=job.deployment_name, queue=priority,
        state=flow_run.state.name if flow_run.state else "Scheduled", position=position, eta=eta, quote=quoted,
        held_micros=hold.held_micros, held_usd=usd_float(hold.held_micros), prefect_url=_url(str(flow_run.id)),
    )


def trigger_training(
    workload: Literal["mnist", "lm"], config: dict[str, Any] | None = None, run: dict[str, Any] | None = None,
    cost: dict[str, Any] | None = None, queue: Priority = "normal", deployment: str = "local",
    experiment: str | None = None, model_name: str | None = None, name: str | None = None,
) -> QueuedJob:
    """Start a training run through its deployment, with the same checks and budget hold as a queued job."""
    job = parse_job({"workload": workload, "deployment": deployment, "config": config or {}, "run": run or {},
                     "cost": cost or {}, "experiment": experiment, "model_name": model_name, "name": name})
    return queue_training_job(job, priority=queue)


def cancel_training_job(flow_run_id: str, reason: str) -> CancelledJob:
    """Cancel a queued or running job and release its queue hold; the reason goes in its state and the ledger."""
    context.flow_run_uuid(flow_run_id)  # a malformed id is refused before any server is asked
    reason = (reason or "").strip()
    if not reason:
        raise InvalidInput("say why the job is cancelled (reason): it is recorded in the run's state and the ledger")
    with context.prefect() as client:
        flow_run = context.read_flow_run(client, flow_run_id)
        state = flow_run.state
        if state is None or state.is_final():
            raise Refused(f"flow run {flow_run_id} already ended {state.name if state else 'without a state'}; "
                          "there is nothing to cancel")
        message = f"cancelled: {reason}"
        running = state.type in (StateType.RUNNING, StateType.CANCELLING)
        # A running run is stopped by its worker (Cancelling), and the flow settles what it spent on the way
        # out; one that has not started is simply cancelled.
        target = Cancelling(message=message) if running else Cancelled(message=message)
        client.set_flow_run_state(flow_run.id, target, force=True)
    with context.ledger() as ledger:
        hold = ledger.queue_hold(flow_run_id)
        released = 0
        if hold is not None and hold.status == HELD:
            released = hold.held_micros
            ledger.release_queued(flow_run_id, message)
    return CancelledJob(flow_run_id=flow_run_id, previous_state=state.name, state=target.name, reason=reason,
                        released_micros=released, released_usd=usd_float(released))


def _check_pool(resolved: ResolvedJob, queue: str, variables: dict[str, Any]) -> None:
    from oppen.submit import check_priced_as_scheduled

    try:
        pool, template = check_request(load_pools(), resolved.work_pool or "", queue, variables)
        if pool.type == "kubernetes":
            check_priced_as_scheduled(resolved.merged_parameters, variables, template)
    except ValueError as error:
        raise InvalidInput(f"{resolved.job.deployment_name}: {error}") from None


def _create(client, resolved: ResolvedJob, queue: str, job_variables: dict[str, Any] | None):
    try:
        return client.create_flow_run_from_deployment(
            resolved.deployment_id, parameters=resolved.parameters, work_queue_name=queue,
            job_variables=job_variables or None, name=resolved.job.name,
            tags=[QUEUED_TAG, f"oppen.priority:{queue}", f"oppen.team:{resolved.cost.team}"],
        )
    except PrefectHTTPStatusError as error:  # the server's own parameter-schema check (409)
        detail = error.response.json().get("detail") if error.response.headers.get("content-type", "").startswith(
            "application/json") else error.response.text
        raise InvalidInput(f"Prefect refused the run of {resolved.job.deployment_name}: {detail}") from None


def _hold_for(quoted: JobQuote) -> timedelta:
    p90 = quoted.quote.p90_seconds if quoted.quote else 3600.0
    return QUEUE_WAIT + timedelta(seconds=3 * p90)


def _url(flow_run_id: str) -> str | None:
    from tasks.run_events import prefect_run_url

    return prefect_run_url(flow_run_id)


def describe(job: QueuedJob) -> str:
    """One line for logs and the CLI: what was queued, where, and what it holds."""
    quote = job.quote
    price = (f"expected {format_usd(to_micros(quote.expected_usd))} (p90 {format_usd(to_micros(quote.p90_usd))})"
             if quote.quote else "no speed history yet: quoted on its first steps")
    return (f"{job.deployment} queued in {job.queue} as {job.flow_run_name} ({job.flow_run_id}): {price}, "
            f"holding {format_usd(job.held_micros)}")
