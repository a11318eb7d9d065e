"""What a finished training flow run produced, read back from Prefect and MLflow."""

from __future__ import annotations

import asyncio
import os
from uuid import UUID

from mlflow import MlflowClient
from pydantic import BaseModel


class RunReport(BaseModel):
    flow_run_id: str
    state: str
    duration_seconds: float | None
    mlflow_run_id: str | None
    mlflow_ui: str | None
    metrics: dict[str, float]
    registered: list[str]  # "name vN (aliases)"


async def _flow_run(flow_run_id: str):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await client.read_flow_run(UUID(flow_run_id))


def collect(flow_run_id: str, tracking_uri: str) -> RunReport:
    flow_run = asyncio.run(_flow_run(flow_run_id))
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiment_ids, filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    run = runs[0] if runs else None
    registered = []
    if run is not None:
        for found in client.search_model_versions(f"run_id = '{run.info.run_id}'"):
            mv = client.get_model_version(found.name, found.version)  # search results omit aliases
            aliases = ", ".join(mv.aliases) or "no alias"
            registered.append(f"{mv.name} v{mv.version} ({aliases})")
    ui = None
    if run is not None and tracking_uri.startswith("http"):
        ui = f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    return RunReport(
        flow_run_id=flow_run_id,
        state=flow_run.state.name if flow_run.state else "unknown",
        duration_seconds=flow_run.total_run_time.total_seconds() if flow_run.total_run_time else None,
        mlflow_run_id=run.info.run_id if run else None,
        mlflow_ui=ui,
        metrics=dict(run.data.metrics) if run else {},
        registered=registered,
    )


def print_summary(flow_run_id: str, env: dict[str, str]) -> RunReport:
    os.environ.update({k: v for k, v in env.items() if k.startswith(("PREFECT_", "OPPEN_"))})
    report = collect(flow_run_id, env["OPPEN_MLFLOW_TRACKING_URI"])
    accuracy = report.metrics.get("test_accuracy")
    print()
    print("=" * 72)
    print(f"flow run        {report.flow_run_id} ({report.state})")
    print(f"test accuracy   {accuracy:.4f}" if accuracy is not None else "test accuracy   (none recorded)")
    print(f"duration        {report.duration_seconds:.1f} s" if report.duration_seconds else "duration        unknown")
    cost = report.metrics.get("cost_usd")
    print(f"cost            ${cost:.6f} (booked in the ledger: `oppen ledger`)" if cost is not None
          else "cost            (none recorded)")
    print(f"MLflow run      {report.mlflow_run_id}")
    print(f"MLflow UI       {report.mlflow_ui or env['OPPEN_MLFLOW_TRACKING_URI']}")
    print(f"registered      {'; '.join(report.registered) or 'nothing (below threshold)'}")
    print(f"Prefect UI      {env['PREFECT_API_URL'].removesuffix('/api')}/runs/flow-run/{report.flow_run_id}")
    print("=" * 72)
    return report
