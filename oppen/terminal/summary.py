"""The summary a finished training run ends with in the terminal: what it cost, against what, and where to look.

`collect` reads the facts through oppen.api (the ledger's money, MLflow's run, Prefect's flow run);
`render` turns them into lines (pure, unit-tested), so the terminal shows the same figures as the
API, the CLI and both UIs.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from oppen.display import duration, percent, signed_percent, usd

LABEL_WIDTH = 15


class BudgetLine(BaseModel):
    model_config = ConfigDict(frozen=True)

    scope: str  # "team default" or "experiment mnist"
    period: str  # "this month" or "in total"
    used_usd: float
    limit_usd: float
    fraction: float


class RunSummaryFacts(BaseModel):
    """Everything the summary shows, gathered after the run ended."""

    model_config = ConfigDict(frozen=True)

    flow_run_id: str
    flow_run_name: str
    workload: str | None
    state: str  # Completed, OverBudget, Failed, ...
    state_message: str | None
    final: bool
    duration_seconds: float | None
    result: str | None  # "test accuracy 99.15%"
    registered: list[str]  # "mnist-cnn version 3 (development)"
    cost_usd: float | None  # the ledger's
    cap_usd: float | None
    booked: bool  # False: the settlement waits for the ledger (oppen reconcile)
    quote_usd: float | None
    quote_error: float | None
    forecast_usd: float | None  # after epoch 1
    forecast_error: float | None
    budgets: list[BudgetLine]
    cheapest_start: datetime | None  # None: starting when it did was already the cheapest
    cheapest_usd: float | None
    saving_usd: float | None
    prefect_url: str | None
    mlflow_url: str | None


def _line(label: str, text: str) -> str:
    return f"  {label:<{LABEL_WIDTH}}{text}"


def render(facts: RunSummaryFacts) -> list[str]:
    """The summary's lines, figures in Oppen's formats (money to the micro-dollar, errors signed, names in words)."""
    title = f"{facts.workload or 'training'} run {facts.flow_run_name}: {facts.state}"
    lines = [title]
    if facts.result:
        lines.append(_line("result", facts.result))
    elif facts.state_message:
        lines.append(_line("why", facts.state_message))
    if facts.registered:
        lines.append(_line("registered", "; ".join(facts.registered)))
    if facts.cost_usd is not None:
        cap = f" of {usd(facts.cap_usd)} cap ({percent(facts.cost_usd / facts.cap_usd)})" if facts.cap_usd else ", no cap"
        booked = "booked in the ledger" if facts.booked else "waiting for the ledger (`oppen reconcile` books it)"
        lines.append(_line("cost", f"{usd(facts.cost_usd)}{cap}, {booked}"))
    if facts.quote_usd is not None:
        error = f", error {signed_percent(facts.quote_error)}" if facts.quote_error is not None else ""
        lines.append(_line("quote", f"{usd(facts.quote_usd)} before training{error}"))
    if facts.forecast_usd is not None:
        error = f", error {signed_percent(facts.forecast_error)}" if facts.forecast_error is not None else ""
        lines.append(_line("forecast", f"{usd(facts.forecast_usd)} after epoch 1{error}"))
    for index, budget in enumerate(facts.budgets):
        lines.append(_line("budget used" if index == 0 else "",
                           f"{budget.scope}: {usd(budget.used_usd)} of {usd(budget.limit_usd)} {budget.period} "
                           f"({percent(budget.fraction)})"))
    if facts.saving_usd and facts.saving_usd > 0 and facts.cheapest_start is not None:
        lines.append(_line("cheapest start", f"{facts.cheapest_start:%Y-%m-%d %H:%M} UTC (off-peak): "
                                             f"{usd(facts.cheapest_usd)}, saves {usd(facts.saving_usd)}"))
    elif facts.quote_usd is not None:
        lines.append(_line("cheapest start", "when it started (already the cheapest window)"))
    if facts.duration_seconds is not None:
        lines.append(_line("took", duration(facts.duration_seconds)))
    if facts.prefect_url:
        lines.append(_line("Prefect UI", facts.prefect_url))
    if facts.mlflow_url:
        lines.append(_line("MLflow UI", facts.mlflow_url))
    return lines
