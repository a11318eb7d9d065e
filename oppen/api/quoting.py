"""A training job as the API takes it, resolved against its deployment, and quoted before it exists.

The quote is the one the flow itself makes before loading its data (`tasks.cost_tasks.read_history`):
the same speed key, the same speed history in MLflow, the same price book. A request with no
history cannot be priced without running it (the flow calibrates on its first steps), so its quote
is `None`: it is then held at its cap when it has one, and checked against what its budgets have left.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectNotFound
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from oppen.api.errors import InvalidInput, NotFound
from oppen.cost.ledger import BudgetUse, Ledger
from oppen.cost.money import Micros, to_micros, usd_float
from oppen.cost.policy import CostPolicy
from oppen.cost.price_book import PriceBook
from oppen.cost.quote import Quote
from oppen.settings import OppenSettings
from tasks.cost_history import speed_key
from tasks.cost_tasks import check_local_resources, read_history
from training.config import RunConfig
from training.runtime import select_device

Priority = Literal["urgent", "normal", "background"]
WORKLOAD_FLOWS = {"mnist": "train-mnist", "lm": "train-lm"}
THRESHOLD_PARAMETER = {"mnist": "min_test_accuracy", "lm": "max_perplexity"}


class TrainingJob(BaseModel):
    """One training request: which workload, on which deployment, with which settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workload: Literal["mnist", "lm"] = Field(description="mnist: the CNN on MNIST; lm: the causal LM on WikiText-2.")
    deployment: str = Field("local", min_length=1, max_length=63, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                            description="Deployment of the workload's flow: local, gpu, gpu-urgent, gpu-spot, ...")
    config: dict[str, Any] = Field(default_factory=dict, description="Workload config fields (MnistConfig / LmConfig).")
    run: dict[str, Any] = Field(default_factory=dict, description="RunConfig fields: epochs, batch_size, max_steps, ...")
    cost: dict[str, Any] = Field(default_factory=dict, description="CostPolicy fields: team, resources, max_cost_usd, spot, ...")
    experiment: str | None = Field(None, description="MLflow experiment and ledger scope (default: the deployment's).")
    model_name: str | None = Field(None, description="Registered model name (default: the deployment's).")
    threshold: float | None = Field(None, description="min_test_accuracy (mnist) or max_perplexity (lm) for registration.")
    name: str | None = Field(None, max_length=120, description="Flow run name (default: Prefect's generated one).")

    @property
    def deployment_name(self) -> str:
        return f"{WORKLOAD_FLOWS[self.workload]}/{self.deployment}"

    def overrides(self) -> dict[str, Any]:
        """The flow parameters this job sets; everything else is the deployment's default."""
        parameters: dict[str, Any] = {}
        for key in ("config", "run", "cost"):
            if getattr(self, key):
                parameters[key] = getattr(self, key)
        if self.experiment is not None:
            parameters["experiment"] = self.experiment
        if self.model_name is not None:
            parameters["model_name"] = self.model_name
        if self.threshold is not None:
            parameters[THRESHOLD_PARAMETER[self.workload]] = self.threshold
        return parameters


class ResolvedJob(BaseModel):
    """A job merged with its deployment's parameters and validated as the flow will validate it."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    job: TrainingJob
    deployment_id: str
    work_pool: str | None
    work_queue: str | None
    parameters: dict[str, Any]  # what the flow run is created with (the job's overrides only)
    merged_parameters: dict[str, Any]  # the deployment's parameters with the job's over them
    job_variables: dict[str, Any]  # the deployment's job variables
    run: RunConfig
    cost: CostPolicy
    experiment: str
    speed_key: str


class JobQuote(BaseModel):
    """What a job is expected to cost, and whether its budgets can take it now."""

    model_config = ConfigDict(frozen=True)

    quote: Quote | None = Field(description="From this request's speed history; None: no history yet.")
    expected_usd: float | None
    p90_usd: float | None
    expected_seconds: float | None
    cheapest_start: datetime | None
    saving_usd: float | None
    cap_usd: float | None
    hold_micros: Micros = Field(description="What queuing it holds against its budgets: p90 (at most the cap), else the cap.")
    fits: bool
    reasons: list[str] = Field(description="Why it does not fit (empty when it fits).")
    budgets: list[dict] = Field(description="Each budget it answers to: scope, amount, used, and the share after this job.")

    @property
    def hold_usd(self) -> float:
        return usd_float(self.hold_micros)


def validation_sentence(error: ValidationError, what: str) -> str:
    """Pydantic's errors as one sentence: `run.epochs: Input should be less than or equal to 1000`."""
    parts = []
    for item in error.errors()[:3]:
        where = ".".join(str(part) for part in item["loc"]) or what
        parts.append(f"{what}.{where}: {item['msg']}" if where != what else f"{what}: {item['msg']}")
    more = f" (and {error.error_count() - 3} more)" if error.error_count() > 3 else ""
    return "; ".join(parts) + more


def parse_job(data: TrainingJob | dict) -> TrainingJob:
    """The job, with what it sets checked on its own: a mistake is refused before any server is asked."""
    try:
        job = data if isinstance(data, TrainingJob) else TrainingJob.model_validate(data)
    except ValidationError as error:
        raise InvalidInput(validation_sentence(error, "job")) from None
    checks = {"config": lambda: workload_config(job.workload, job.config), "run": lambda: RunConfig.model_validate(job.run),
              "cost": lambda: CostPolicy.model_validate(job.cost)}
    for part, check in checks.items():
        if getattr(job, part):
            try:
                check()
            except ValidationError as error:
                raise InvalidInput(validation_sentence(error, part)) from None
    return job


def workload_config(workload: str, config: dict[str, Any]) -> BaseModel:
    if workload == "mnist":
        from training.mnist.workload import MnistConfig

        return MnistConfig.model_validate(config)
    from training.lm.workload import LmConfig

    return LmConfig.model_validate(config)


def _data_source(workload: str, config: BaseModel) -> str:
    if workload == "mnist":
        from training.mnist.data import local_directory
    else:
        from training.lm.data import local_directory
    local = local_directory(getattr(config, "data_dir", None))
    return str(local) if local else "hub"


def resolve(client: SyncPrefectClient, job: TrainingJob) -> ResolvedJob:
    """Read the deployment, merge the job over its parameters, and validate them like the flow will."""
    try:
        deployment = client.read_deployment_by_name(job.deployment_name)
    except ObjectNotFound:
        raise NotFound(f"no deployment {job.deployment_name} on this Prefect server; "
                       "`prefect deployment ls` lists them (deploy with `prefect deploy --all`)") from None
    merged = dict(deployment.parameters or {}) | job.overrides()
    try:
        config = workload_config(job.workload, merged.get("config") or {})
        run = RunConfig.model_validate(merged["run"] or {}) if "run" in merged else flow_default(job.workload, "run")
        cost = CostPolicy.model_validate(merged.get("cost") or {})
    except ValidationError as error:
        raise InvalidInput(validation_sentence(error, "job")) from None
    try:
        check_local_resources(cost.resources, run) if deployment.work_pool_name == "local" else None
    except ValueError as error:
        raise InvalidInput(str(error)) from None
    experiment = merged.get("experiment") or flow_default(job.workload, "experiment")
    device = str(select_device(run.device)) if deployment.work_pool_name == "local" else _pool_device(cost)
    key = speed_key(job.workload, config.model_dump(mode="json", exclude={"data_dir"}),
                    _data_source(job.workload, config), run, cost.resources, device)
    return ResolvedJob(job=job, deployment_id=str(deployment.id), work_pool=deployment.work_pool_name,
                       work_queue=deployment.work_queue_name, parameters=job.overrides(), merged_parameters=merged,
                       job_variables=dict(deployment.job_variables or {}), run=run, cost=cost,
                       experiment=experiment, speed_key=key)


def flow_default(workload: str, parameter: str) -> Any:
    """A parameter's default as the workload's flow declares it (the one place it is written down)."""
    import inspect

    if workload == "mnist":
        from flows.train_mnist import train_mnist as flow
    else:
        from flows.train_lm import train_lm as flow
    return inspect.signature(flow.fn).parameters[parameter].default


def _pool_device(cost: CostPolicy) -> str:
    """On a GPU pool the run trains where its pod lands: on CUDA when it asks for GPUs."""
    return "cuda" if cost.resources.gpus else "cpu"


def hold_for_job(quote: Quote | None, cost: CostPolicy) -> Micros:
    """p90 of the quote, never more than the cap; with no quote, the cap (or nothing)."""
    cap = to_micros(cost.max_cost_usd, ceiling=True) if cost.max_cost_usd is not None else None
    if quote is None:
        return cap or 0
    p90 = to_micros(quote.p90_usd)
    return min(p90, cap) if cap is not None else p90


def quote_job(settings: OppenSettings, ledger: Ledger, book: PriceBook, resolved: ResolvedJob) -> JobQuote:
    """The flow's own pre-loading quote, and the job's budgets as they stand with it added."""
    history = read_history(settings, book, resolved.run, resolved.cost, resolved.speed_key)
    quote = history.quote
    cost = resolved.cost
    if cost.team not in ledger.team_names():
        raise NotFound(f"unknown team {cost.team!r} (known: {', '.join(ledger.team_names())}); "
                       "add it to the budgets file and run `oppen budgets apply`")
    hold = hold_for_job(quote, cost)
    uses = ledger.budget_uses(cost.team, resolved.experiment, hold)
    reasons = [f"over budget: {use.describe()}" for use in uses if not use.fits]
    reasons += [f"budget exhausted: {use.describe()}" for use in uses
                if use.fits and use.used_micros >= use.amount_micros]
    return JobQuote(
        quote=quote,
        expected_usd=quote.expected_usd if quote else None, p90_usd=quote.p90_usd if quote else None,
        expected_seconds=quote.expected_seconds if quote else None,
        cheapest_start=quote.cheapest_start if quote else None, saving_usd=quote.saving_usd if quote else None,
        cap_usd=cost.max_cost_usd, hold_micros=hold, fits=not reasons, reasons=reasons,
        budgets=[_budget_row(use) for use in uses],
    )


def _budget_row(use: BudgetUse) -> dict:
    return {"scope": use.scope, "period": use.period, "amount_micros": use.amount_micros,
            "used_micros": use.used_micros, "request_micros": use.request_micros,
            "fraction_after": round(use.fraction_after, 6), "fits": use.fits}
