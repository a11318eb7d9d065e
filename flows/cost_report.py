"""The cost-report flow: spend per team / experiment over a date range, with the quality trend."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Annotated

from mlflow.exceptions import MlflowException
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from oppen import tracking_keys as keys
from oppen.display import usd
from oppen.cost.budgets import open_ledger
from oppen.cost.policy import NAME_PATTERN
from oppen.cost.report import build_frame, markdown_table, summarize, trend
from oppen.settings import OppenSettings, load_settings
from tasks.cost_report_notice import post_report
from tasks.tracking import client_for


class ReportRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    team: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    experiment: Annotated[str, Field(min_length=1)] | None = None
    start: date | None = Field(None, description="First day included (UTC); None: `last_days` before the end.")
    end: date | None = Field(None, description="Last day included (UTC); None: today.")
    last_days: int = Field(30, ge=1, le=3660, description="Days covered when `start` is left out (a weekly report: 7).")

    @model_validator(mode="after")
    def _ordered(self) -> ReportRequest:
        if self.start and self.end and self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self

    def bounds(self) -> tuple[datetime, datetime]:
        end = self.end or datetime.now(timezone.utc).date()
        start = self.start or end - timedelta(days=self.last_days - 1)
        return (datetime.combine(start, time(), tzinfo=timezone.utc),
                datetime.combine(end + timedelta(days=1), time(), tzinfo=timezone.utc))


class CostReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    runs: int
    total_usd: float
    trend: str
    trend_slope: float | None
    csv_path: str
    by_scope: list[dict]


@task(cache_policy=NONE)
def collect(settings: OppenSettings, request: ReportRequest):
    since, until = request.bounds()
    ledger = open_ledger(settings.ledger, settings.budgets_file)
    try:
        if request.team and request.team not in ledger.team_names():
            raise ValueError(f"unknown team {request.team!r} (known: {', '.join(ledger.team_names())})")
        rows = ledger.rows(team=request.team, experiment=request.experiment, since=since, until=until)
    finally:
        ledger.dispose()
    client = client_for(settings)
    quality = {}
    for row in rows:
        run_id = row.get("mlflow_run_id")
        if not run_id:
            continue
        try:
            metrics = client.get_run(run_id).data.metrics
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            continue  # the MLflow run was deleted (or its store reset): the ledger's money still counts
        for name in ("test_accuracy", "eval_perplexity"):
            if keys.metric_key(name) in metrics:
                quality[run_id] = (name, metrics[keys.metric_key(name)], metrics.get(keys.COST_PER_POINT))
                break
    return build_frame(rows, quality)


@flow(name="cost-report", log_prints=True, validate_parameters=True)
def cost_report(request: ReportRequest = ReportRequest(), post_to_slack: bool = False) -> CostReport:
    """Spend per team and experiment from the ledger, with quality from MLflow; a table, a CSV and the trend."""
    settings = load_settings()
    frame = collect(settings, request)
    totals = summarize(frame)
    direction, slope = trend(frame)
    since, until = request.bounds()
    settings.reports_dir().mkdir(parents=True, exist_ok=True)
    scope = "-".join(part for part in (request.team, request.experiment) if part) or "all"
    csv_path = settings.reports_dir() / f"cost-{scope}-{since:%Y%m%d}-{until - timedelta(days=1):%Y%m%d}.csv"
    frame.to_csv(csv_path, index=False)
    table = frame.assign(created_at=frame["created_at"].astype(str)).round(8).to_dict(orient="records")
    create_table_artifact(table, key="cost-report-runs", description=f"runs {since:%Y-%m-%d}..{until:%Y-%m-%d}")
    total = int(frame["actual_micros"].sum()) / 1_000_000 if not frame.empty else 0.0
    lines = [
        f"# Cost report: {scope}, {since:%Y-%m-%d} to {until - timedelta(days=1):%Y-%m-%d}",
        "",
        f"**{len(frame)} runs, {usd(total)}**. Cost per quality point is **{direction}**"
        + (f" ({slope:+.1%} per run)." if slope is not None else "."),
        "",
        markdown_table(totals) if not totals.empty else "(no spend in range)",
        "",
        f"CSV: `{csv_path}`",
    ]
    create_markdown_artifact("\n".join(lines), key="cost-report", description=f"{usd(total)}: cost report {scope}")
    get_run_logger().info("%d runs, %s, trend %s; CSV at %s", len(frame), usd(total), direction, csv_path)
    report = CostReport(runs=len(frame), total_usd=total, trend=direction, trend_slope=slope, csv_path=str(csv_path),
                        by_scope=totals.to_dict(orient="records"))
    if post_to_slack:
        post_report(report, f"Cost report: {scope}", f"{since:%Y-%m-%d} to {until - timedelta(days=1):%Y-%m-%d}",
                    request.team)
    return report
