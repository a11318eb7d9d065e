"""Gather a finished run's summary facts through oppen.api: the ledger's money, MLflow's run, Prefect's state."""

from __future__ import annotations

from datetime import datetime

from oppen.api.errors import ApiError
from oppen.display import metric_phrase
from oppen.links import prefect_flow_run_url
from oppen.terminal.summary import BudgetLine, RunSummaryFacts
from oppen.tracking_keys import metric_key
from tasks.run_records import TEST_METRICS


def collect(flow_run_id: str) -> RunSummaryFacts:
    from oppen import api
    from oppen.api import context

    with context.prefect() as client:
        flow_run = context.read_flow_run(client, flow_run_id)
    state = flow_run.state
    try:
        cost = api.calculate_training_cost(flow_run_id)
    except ApiError:  # refused before the ledger knew it (an invalid request): no money to show
        cost = None
    tracked = api.get_experiment_metrics(cost.mlflow_run_id) if cost and cost.mlflow_run_id else None
    workload = (cost.workload if cost else None) or (tracked.workload if tracked else None)
    params = tracked.params if tracked else {}
    booked = cost is not None and cost.status not in ("unbooked", "queued", "reserved")
    return RunSummaryFacts(
        flow_run_id=flow_run_id, flow_run_name=flow_run.name, workload=workload,
        state=state.name if state else "Unknown", state_message=state.message if state else None,
        final=bool(state and state.is_final()),
        duration_seconds=flow_run.total_run_time.total_seconds() if flow_run.total_run_time else None,
        result=_result(workload, tracked), registered=[
            f"{version.name} version {version.version} ({', '.join(version.aliases) or 'no alias'})"
            for version in (tracked.model_versions if tracked else [])],
        cost_usd=(cost.spent_usd if booked else cost.mlflow_cost_usd) if cost else None,
        cap_usd=cost.cap_usd if cost else None, booked=booked, quote_usd=cost.quote_usd if cost and cost.quote_micros else None,
        quote_error=cost.quote_error if cost else None,
        forecast_usd=cost.forecast_after_epoch1_usd if cost else None, forecast_error=cost.forecast_error if cost else None,
        budgets=_budgets(cost.team, cost.experiment) if cost else [],
        cheapest_start=_time(params.get("quote.cheapest_start")),
        cheapest_usd=_float(params.get("quote.cheapest_usd")), saving_usd=_float(params.get("quote.saving_usd")),
        prefect_url=prefect_flow_run_url(flow_run_id), mlflow_url=tracked.links.mlflow if tracked else None,
    )


def _result(workload: str | None, tracked) -> str | None:
    if tracked is None or workload not in TEST_METRICS:
        return None
    name, _ = TEST_METRICS[workload]
    value = tracked.metrics.test.get(metric_key(name))
    return metric_phrase(name, value) if value is not None else None


def _budgets(team: str | None, experiment: str | None) -> list[BudgetLine]:
    """The team's own budget and the experiment's, as they stand now (the run's charge included)."""
    from oppen import api

    if not team:
        return []
    try:
        quota = api.check_training_quota(team)
    except ApiError:
        return []
    lines = []
    for budget in quota.budgets:
        if budget.experiment not in (None, experiment):
            continue
        scope = f"experiment {budget.experiment}" if budget.experiment else f"team {budget.team}"
        period = f"in {budget.month}" if budget.period == "monthly" and budget.month else "in total"
        lines.append(BudgetLine(scope=scope, period=period, used_usd=budget.used_usd, limit_usd=budget.limit_usd,
                                fraction=budget.fraction_used))
    return lines


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "None") else None
    except ValueError:
        return None


def _time(value: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if value else None
    except ValueError:
        return None
