"""The cost report, posted to Slack (the weekly `cost-report/weekly` deployment does this every Monday)."""

from __future__ import annotations

from prefect import get_run_logger
from prefect.runtime import flow_run

from oppen.events import RunEventContext
from oppen.notify.blocks import cost_report_message
from tasks.run_events import prefect_run_url
from tasks.slack import notify_slack, record_failure


def post_report(report, title: str, period: str, team: str | None) -> None:
    """One Block Kit message with the spend per team and experiment; a Slack failure is logged and recorded."""
    rows = [{"team": row["team"], "experiment": row["experiment"], "runs": int(row["runs"]),
             "cost_usd": float(row["actual_usd"])} for row in report.by_scope]
    links = {"prefect": url} if (url := prefect_run_url(flow_run.get_id())) else {}
    message = cost_report_message(title, rows, report.total_usd, period, links)
    events = RunEventContext(flow_run_id=flow_run.get_id(), team=team or "all", experiment="cost-report",
                             workload="cost-report", flow_run_name=flow_run.get_name(), links=links)
    delivery = notify_slack(message, team, on_failure=lambda failed: record_failure(events, failed, "cost-report"))
    get_run_logger().info("cost report to Slack: %s", delivery.status)
