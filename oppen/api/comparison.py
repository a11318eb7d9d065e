"""Candidate configs side by side: compare_training_configs.

Each candidate's quote (`quote_job`) beside the quality its history reached: a candidate without
speed history has no quote, and says so, rather than being given a number nobody measured.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from mlflow import MlflowClient
from mlflow.entities import Run
from pydantic import BaseModel, ConfigDict, Field

from oppen import tracking_keys as keys
from oppen.api import context
from oppen.api.errors import ApiError, InvalidInput
from oppen.api.quoting import JobQuote, ResolvedJob, TrainingJob, parse_job, quote_job, resolve
from oppen.api.quoting import workload_config
from oppen.cost.money import format_usd_amount
from tasks.cost_history import SPEED_KEY_TAG
from tasks.run_records import TEST_METRICS
from tasks.tracking import flatten


MIN_CANDIDATES, MAX_CANDIDATES = 2, 20
QUALITY_RUNS = 20  # the newest finished runs of the same settings read per candidate: enough for a mean and a best
# The run settings that change what a run reaches (besides the speed key's model, data, batch and hardware).
RECIPE = ("epochs", "learning_rate", "max_steps")


class CandidateRow(BaseModel):
    """One candidate job: its quote, the quality its history reached, and what it stands out for."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="Its place in the request, from 1.")
    deployment: str = Field(description="FLOW/DEPLOYMENT.")
    changes: str = Field(description="What the job sets (its config, run and cost overrides).")
    quoted: bool = Field(description="It has speed history and was priced; False: no history, no numbers.")
    expected_usd: float | None = Field(description="Expected cost if started now.")
    p90_usd: float | None = Field(description="Cost it stays under 9 times in 10.")
    expected_seconds: float | None = Field(description="Expected wall time.")
    cost_per_epoch_usd: float | None = Field(description="One full epoch's cost.")
    cheapest_start: datetime | None = Field(description="When starting costs least.")
    saving_usd: float | None = Field(description="What starting then saves.")
    fits_budget: bool = Field(description="Its budgets can take its hold now.")
    reasons: list[str] = Field(description="Why its budgets cannot take it (empty when they can).")
    quality_metric: str | None = Field(description="test_accuracy (mnist, higher is better) or eval_perplexity (lm).")
    higher_is_better: bool | None = Field(description="Direction of the quality metric.")
    history_runs: int = Field(description="Earlier finished runs its quality figures come from.")
    quality_basis: Literal["same settings", "same speed key", "same settings, other hardware"] | None = Field(
        description="Which earlier runs: the same speed key and epochs/learning rate/max_steps; the same speed key "
        "only; or the same workload, config and run settings on other hardware. None: no history.")
    best_quality: float | None = Field(description="The best value of the metric among them.")
    mean_quality: float | None = Field(description="Their mean value.")
    history_mean_cost_usd: float | None = Field(description="What they cost on average.")
    cost_per_point_usd: float | None = Field(description="expected_usd per quality point (accuracy percentage point, "
                                             "or perplexity below the untrained baseline) its history reached.")
    cheapest: bool = Field(description="The lowest expected cost of the quoted candidates.")
    fastest: bool = Field(description="The shortest expected time of the quoted candidates.")
    best: bool = Field(description="The best mean quality (per metric) of the candidates with history.")
    note: str | None = Field(description="What is missing, said plainly.")


class ConfigComparison(BaseModel):
    """Candidates side by side on quoted cost, time and the quality their history reached."""

    model_config = ConfigDict(frozen=True)

    rows: list[CandidateRow] = Field(description="One per candidate, in the order given.")
    cheapest: int | None = Field(description="Index of the cheapest quoted candidate.")
    fastest: int | None = Field(description="Index of the fastest quoted candidate.")
    best_quality: int | None = Field(description="Index of the best candidate by mean quality.")
    summary: str = Field(description="One line for a person.")


@dataclass(frozen=True)
class Quality:
    metric: str | None
    higher_is_better: bool | None
    basis: str | None
    values: list[float]
    costs: list[float]
    points: list[float]  # quality points each run bought (cost / cost per point, as it logged them)


def compare_training_configs(jobs: list[TrainingJob | dict]) -> ConfigComparison:
    """2 to 20 candidate jobs: quoted cost and time beside the quality earlier runs of each reached."""
    if not isinstance(jobs, (list, tuple)) or not MIN_CANDIDATES <= len(jobs) <= MAX_CANDIDATES:
        count = len(jobs) if isinstance(jobs, (list, tuple)) else type(jobs).__name__
        raise InvalidInput(f"compare {MIN_CANDIDATES} to {MAX_CANDIDATES} candidate jobs, got {count}")
    parsed = [_candidate(index, lambda job=job: parse_job(job)) for index, job in enumerate(jobs, start=1)]
    settings, book = context.settings(), context.price_book()
    client = context.mlflow(settings)
    with context.prefect() as prefect:
        resolved = [_candidate(index, lambda job=job: resolve(prefect, job)) for index, job in enumerate(parsed, start=1)]
    with context.ledger(settings) as ledger:
        quotes = [_candidate(index, lambda r=r: quote_job(settings, ledger, book, r))
                  for index, r in enumerate(resolved, start=1)]
    rows = [_row(index, r, q, quality_history(client, r)) for index, (r, q) in enumerate(zip(resolved, quotes), start=1)]
    return _flagged(rows)


def _candidate(index: int, step):
    """A candidate's mistake names the candidate."""
    try:
        return step()
    except ApiError as error:
        raise type(error)(f"candidate {index}: {error}") from None


def quality_history(client: MlflowClient, resolved: ResolvedJob) -> Quality:
    """Finished runs with this speed key (the same settings preferred), else the same settings on other hardware.

    The matching is MLflow's (filter clauses on tags, params and the metric), so it returns only runs that
    count: each run it returns costs it a read of all the run's params, tags and metrics.
    """
    metric, higher = TEST_METRICS[resolved.job.workload]
    key = keys.metric_key(metric)
    scored = f"metrics.`{key}` >= 0"  # evaluated runs only (accuracy and perplexity are never negative)
    keyed = f"tags.`{SPEED_KEY_TAG}` = '{resolved.speed_key}'"
    recipe = _recipe(resolved)
    runs, basis = _finished(client, [keyed, scored], recipe), "same settings"
    if not runs:
        runs, basis = _finished(client, [keyed, scored], {}), "same speed key"
    if not runs:
        workload = f"tags.`oppen.workload` = '{resolved.job.workload}'"
        runs, basis = _finished(client, [workload, scored], recipe | _settings(resolved)), "same settings, other hardware"
    costs = [run.data.metrics[keys.COST_TOTAL] for run in runs if keys.COST_TOTAL in run.data.metrics]
    points = [run.data.metrics[keys.COST_TOTAL] / run.data.metrics[keys.COST_PER_POINT] for run in runs
              if run.data.metrics.get(keys.COST_PER_POINT, 0) > 0 and run.data.metrics.get(keys.COST_TOTAL, 0) > 0]
    return Quality(metric, higher, basis if runs else None, [run.data.metrics[key] for run in runs], costs, points)


def _finished(client: MlflowClient, conditions: list[str], params: dict[str, str | None]) -> list[Run]:
    """The newest finished runs meeting `conditions` whose params are `params` (None: logged as "None")."""
    experiments = [experiment.experiment_id for experiment in client.search_experiments()]
    if not experiments:
        return []
    # A value MLflow's filter cannot quote is matched here instead, on what the filter let through.
    quotable = {name: value for name, value in params.items() if "'" not in str(value) and "`" not in name}
    clauses = [*conditions, "attributes.status = 'FINISHED'",
               *(f"params.`{name}` = '{'None' if value is None else value}'" for name, value in quotable.items())]
    found = client.search_runs(experiments, filter_string=" and ".join(clauses),
                               order_by=["attributes.start_time DESC"], max_results=QUALITY_RUNS)
    rest = {name: value for name, value in params.items() if name not in quotable}
    return [run for run in found if _matches(run, rest)] if rest else found


def _recipe(resolved: ResolvedJob) -> dict[str, str | None]:
    """The run settings beside the speed key that decide the quality reached, as MLflow logs them."""
    logged = flatten({"run": resolved.run.model_dump(mode="json")})
    return {f"run.{name}": logged.get(f"run.{name}") for name in RECIPE}


def _settings(resolved: ResolvedJob) -> dict[str, str | None]:
    """The workload config (as the flow logs it) and the batch size: what the speed key covers besides hardware."""
    config = workload_config(resolved.job.workload, resolved.merged_parameters.get("config") or {})
    logged = flatten({"config": config.model_dump(mode="json", exclude={"data_dir"})})
    return logged | {"run.batch_size": str(resolved.run.batch_size)}


def _matches(run: Run, wanted: dict[str, str | None]) -> bool:
    params = run.data.params
    return all((params.get(key) if params.get(key) != "None" else None) == value for key, value in wanted.items())


def _row(index: int, resolved: ResolvedJob, quoted: JobQuote, quality: Quality) -> CandidateRow:
    quote = quoted.quote
    mean = statistics.fmean(quality.values) if quality.values else None
    best = (max(quality.values) if quality.higher_is_better else min(quality.values)) if quality.values else None
    per_point = quote.expected_usd / statistics.fmean(quality.points) if quote and quality.points else None
    missing = []
    if quote is None:
        missing.append("no speed history for this config: not priced (run it once, or quote it by calibration in "
                       "its flow)")
    if not quality.values:
        missing.append("no finished run of this config has a quality figure yet")
    return CandidateRow(
        index=index, deployment=resolved.job.deployment_name, changes=_changes(resolved.job), quoted=quote is not None,
        expected_usd=quote.expected_usd if quote else None, p90_usd=quote.p90_usd if quote else None,
        expected_seconds=quote.expected_seconds if quote else None,
        cost_per_epoch_usd=quote.cost_per_epoch_usd if quote else None,
        cheapest_start=quote.cheapest_start if quote else None, saving_usd=quote.saving_usd if quote else None,
        fits_budget=quoted.fits, reasons=list(quoted.reasons), quality_metric=quality.metric,
        higher_is_better=quality.higher_is_better, history_runs=len(quality.values), quality_basis=quality.basis,
        best_quality=best, mean_quality=mean,
        history_mean_cost_usd=statistics.fmean(quality.costs) if quality.costs else None,
        cost_per_point_usd=per_point, cheapest=False, fastest=False, best=False,
        note="; ".join(missing) or None,
    )


def _changes(job: TrainingJob) -> str:
    overrides = job.overrides()
    flat = flatten(overrides)
    return ", ".join(f"{key}={value}" for key, value in sorted(flat.items())) or "the deployment's defaults"


def _flagged(rows: list[CandidateRow]) -> ConfigComparison:
    quoted = [row for row in rows if row.quoted]
    cheapest = min(quoted, key=lambda row: row.expected_usd, default=None)
    fastest = min(quoted, key=lambda row: row.expected_seconds, default=None)
    best_by_metric: dict[str, CandidateRow] = {}
    for row in rows:
        if row.mean_quality is None:
            continue
        leader = best_by_metric.get(row.quality_metric)
        better = leader is None or (row.mean_quality > leader.mean_quality if row.higher_is_better
                                    else row.mean_quality < leader.mean_quality)
        if better:
            best_by_metric[row.quality_metric] = row
    best_indexes = {row.index for row in best_by_metric.values()}
    flagged = [row.model_copy(update={
        "cheapest": cheapest is not None and row.index == cheapest.index,
        "fastest": fastest is not None and row.index == fastest.index,
        "best": row.index in best_indexes,
    }) for row in rows]
    best_quality = min(best_indexes) if len(best_indexes) == 1 else None
    comparison = ConfigComparison(rows=flagged, cheapest=cheapest.index if cheapest else None,
                                  fastest=fastest.index if fastest else None, best_quality=best_quality, summary="")
    return comparison.model_copy(update={"summary": _describe_comparison(comparison)})


def _describe_comparison(comparison: ConfigComparison) -> str:
    rows = {row.index: row for row in comparison.rows}
    parts = [f"{sum(row.quoted for row in comparison.rows)} of {len(comparison.rows)} candidates quoted"]
    if comparison.cheapest:
        parts.append(f"cheapest #{comparison.cheapest} ({format_usd_amount(rows[comparison.cheapest].expected_usd)})")
    if comparison.fastest:
        parts.append(f"fastest #{comparison.fastest} ({rows[comparison.fastest].expected_seconds:.0f} s)")
    if comparison.best_quality:
        best = rows[comparison.best_quality]
        parts.append(f"best quality #{best.index} ({best.quality_metric} {best.mean_quality:.4f} over "
                     f"{best.history_runs} run(s))")
    return "; ".join(parts)
