"""The recommend-savings flow: what a finished run could have cost less, and how."""

from __future__ import annotations

from typing import Annotated

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from oppen.cost.price_book import load_price_book
from oppen.cost.recommend import Recommendation, recommend
from oppen.settings import load_settings
from tasks.run_records import history_of, record_of
from tasks.tracking import client_for


@flow(name="recommend-savings", log_prints=True, validate_parameters=True)
def recommend_savings(run_id: Annotated[str, Field(min_length=8, pattern=r"^[0-9a-f]+$")]) -> list[Recommendation]:
    """Every strategy that has data behind it for this MLflow run, largest saving first."""
    settings = load_settings()
    client = client_for(settings)
    run = client.get_run(run_id)  # an unknown id fails here with MLflow's RESOURCE_DOES_NOT_EXIST
    record = record_of(client, run)
    if record is None:
        raise ValueError(f"run {run_id} has no settled cost (refused, still running, or not an Oppen run)")
    found = recommend(record, history_of(client, run), load_price_book(settings.price_book))
    lines = [f"# Savings for run {run_id[:8]} (${record.cost_usd:.6f})", ""]
    if not found:
        lines.append("No strategy has data showing a saving for this run.")
    else:
        lines += ["| strategy | action | saving | evidence |", "| --- | --- | --- | --- |"]
        lines += [f"| {r.strategy} | {r.action} | ${r.saving_usd:.6f} ({r.saving_seconds:+.0f} s) | {r.evidence} |"
                  for r in found]
    create_markdown_artifact("\n".join(lines), key="savings", description=f"savings for {run_id[:8]}")
    for item in found:
        get_run_logger().info("%s: %s (saves $%.6f)", item.strategy, item.action, item.saving_usd)
    return found
