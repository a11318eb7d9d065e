"""Check and quote a job before it exists: validate_job_resources.

The pool's checks (as `oppen submit` makes them), the flow's own quote (`quote_job`, from speed
history) and the budgets with the job added. It creates nothing on the server or in the ledger.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from oppen.api import context
from oppen.api.errors import NotFound
from oppen.api.quoting import JobQuote, ResolvedJob, TrainingJob, parse_job, quote_job, resolve
from oppen.api.resources import ClusterCheck, check_pool_request
from oppen.cost.money import Micros, format_usd, format_usd_amount, usd_float
from oppen.cost.price_book import Resources


class BudgetRow(BaseModel):
    """One budget the job answers to, as it stands with the job's hold added."""

    model_config = ConfigDict(frozen=True)

    scope: str = Field(description="'team T' or 'experiment T/E'.")
    period: str = Field(description="monthly (calendar month, UTC) or total.")
    amount_micros: Micros = Field(description="The budget, in micro-dollars.")
    amount_usd: float = Field(description="The same, in dollars.")
    used_micros: Micros = Field(description="Spent in its period plus every hold now, in micro-dollars.")
    used_usd: float = Field(description="The same, in dollars.")
    request_micros: Micros = Field(description="What this job would hold, in micro-dollars.")
    request_usd: float = Field(description="The same, in dollars.")
    fraction_after: float = Field(description="Share of the budget used with the job added.")
    fits: bool = Field(description="Used plus the job's hold stays within the budget.")


class ResourceVerdict(BaseModel):
    """Whether a job can run as asked: its pool, its resources, its quote and its budgets."""

    model_config = ConfigDict(frozen=True)

    feasible: bool = Field(description="Its pool can run it and its budgets can take it now.")
    resources_ok: bool = Field(description="Its pool, queue, job variables and resources pass every check.")
    fits_budget: bool | None = Field(description="Its budgets can take its hold; None when it was not quoted "
                                     "(its resources cannot run on its pool).")
    reasons: list[str] = Field(description="Why it is not feasible, one sentence each (empty when feasible).")
    notes: list[str] = Field(description="What to know that does not stop it (it waits for GPUs, no history, "
                             "no cluster checked).")
    deployment: str = Field(description="FLOW/DEPLOYMENT it would run through.")
    work_pool: str | None = Field(description="The deployment's work pool.")
    work_queue: str | None = Field(description="The deployment's work queue.")
    pool_type: str | None = Field(description="process (this machine) or kubernetes; None: not in the pools file.")
    resources: Resources | None = Field(description="What the run is billed for while it runs.")
    cluster: ClusterCheck | None = Field(description="The cluster's verdict (a Kubernetes pool with a kube context).")
    quoted: bool = Field(description="It has speed history, so it was priced before running.")
    expected_usd: float | None = Field(description="Expected cost if started now; None without history.")
    p90_usd: float | None = Field(description="Cost it stays under 9 times in 10.")
    expected_seconds: float | None = Field(description="Expected wall time, loading and model logging included.")
    cost_per_epoch_usd: float | None = Field(description="One full epoch's cost at this price.")
    cheapest_start: datetime | None = Field(description="When starting costs least (the next off-peak window, or now).")
    cheapest_usd: float | None = Field(description="Its expected cost when started then.")
    saving_usd: float | None = Field(description="expected_usd - cheapest_usd.")
    cap_usd: float | None = Field(description="The run's max_cost_usd.")
    hold_micros: Micros = Field(description="What queuing it would hold against its budgets: p90 (at most the cap), "
                                "else the cap.")
    hold_usd: float = Field(description="The same, in dollars.")
    budgets: list[BudgetRow] = Field(description="Each budget it answers to, with its hold added.")
    speed_key: str | None = Field(description="The key its speed history is kept under in MLflow.")
    summary: str = Field(description="One line for a person.")


def validate_job_resources(job: TrainingJob | dict) -> ResourceVerdict:
    """Check a job against its pool, quote it, and check its budgets, without creating anything anywhere."""
    job = parse_job(job)
    settings, book = context.settings(), context.price_book()
    with context.prefect() as client:
        deployment = _deployment(client, job)
        merged = dict(deployment.parameters or {}) | job.overrides()
        variables = dict(deployment.job_variables or {})
        findings = check_pool_request(deployment.work_pool_name, deployment.work_queue_name, variables, merged)
        # A request its pool cannot run is not resolved (resolve refuses it) and not quoted: its speed key
        # names hardware that is not here, so no history can exist for it.
        resolved = resolve(client, job) if findings.runs_here else None
    quoted = None
    if resolved is not None:
        with context.ledger(settings) as ledger:
            quoted = quote_job(settings, ledger, book, resolved)
    return _verdict(job, deployment, findings, resolved, quoted, merged)


def _deployment(client, job: TrainingJob):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(job.deployment_name)
    except ObjectNotFound:
        raise NotFound(f"no deployment {job.deployment_name} on this Prefect server; "
                       "`prefect deployment ls` lists them (deploy with `prefect deploy --all`)") from None


def _verdict(job: TrainingJob, deployment, findings, resolved: ResolvedJob | None, quoted: JobQuote | None,
             merged: dict[str, Any]) -> ResourceVerdict:
    reasons = list(findings.problems) + (list(quoted.reasons) if quoted else [])
    notes = list(findings.notes)
    if quoted is not None and quoted.quote is None:
        held = f"its cap ({format_usd(quoted.hold_micros)})" if quoted.hold_micros else "nothing held for it"
        notes.append("no speed history for this config: not priced before running (the flow calibrates on its "
                     f"first steps); its budgets were checked with {held}")
    quote = quoted.quote if quoted else None
    verdict = ResourceVerdict(
        feasible=not reasons, resources_ok=not findings.problems, fits_budget=quoted.fits if quoted else None,
        reasons=reasons, notes=notes, deployment=job.deployment_name, work_pool=deployment.work_pool_name,
        work_queue=deployment.work_queue_name, pool_type=findings.pool_type,
        resources=resolved.cost.resources if resolved else _requested_resources(merged),
        cluster=findings.cluster, quoted=quote is not None,
        expected_usd=quote.expected_usd if quote else None, p90_usd=quote.p90_usd if quote else None,
        expected_seconds=quote.expected_seconds if quote else None,
        cost_per_epoch_usd=quote.cost_per_epoch_usd if quote else None,
        cheapest_start=quote.cheapest_start if quote else None, cheapest_usd=quote.cheapest_usd if quote else None,
        saving_usd=quote.saving_usd if quote else None,
        cap_usd=resolved.cost.max_cost_usd if resolved else None,
        hold_micros=quoted.hold_micros if quoted else 0, hold_usd=usd_float(quoted.hold_micros) if quoted else 0.0,
        budgets=[_budget_row(row) for row in quoted.budgets] if quoted else [],
        speed_key=resolved.speed_key if resolved else None, summary="",
    )
    return verdict.model_copy(update={"summary": _describe_verdict(verdict)})


def _requested_resources(merged: dict[str, Any]) -> Resources | None:
    from pydantic import ValidationError

    from oppen.cost.policy import CostPolicy

    try:
        return CostPolicy.model_validate(merged.get("cost") or {}).resources
    except ValidationError:
        return None


def _budget_row(row: dict) -> BudgetRow:
    return BudgetRow(
        scope=row["scope"], period=row["period"], amount_micros=row["amount_micros"],
        amount_usd=usd_float(row["amount_micros"]), used_micros=row["used_micros"], used_usd=usd_float(row["used_micros"]),
        request_micros=row["request_micros"], request_usd=usd_float(row["request_micros"]),
        fraction_after=row["fraction_after"], fits=row["fits"],
    )


def _describe_verdict(verdict: ResourceVerdict) -> str:
    if verdict.quoted:
        price = (f"expected {format_usd_amount(verdict.expected_usd)} (p90 {format_usd_amount(verdict.p90_usd)}) in "
                 f"{verdict.expected_seconds:.0f} s")
        if verdict.saving_usd and verdict.cheapest_start:
            price += f"; from {verdict.cheapest_start:%Y-%m-%d %H:%M} UTC it saves {format_usd_amount(verdict.saving_usd)}"
    else:
        price = "not quoted (no speed history)"
    if verdict.feasible:
        return f"{verdict.deployment}: feasible; {price}"
    return f"{verdict.deployment}: not feasible: {'; '.join(verdict.reasons)}" + (f"; {price}" if verdict.quoted else "")
