"""recommend_cost_optimization: what a finished run could have cost less, and how.

The recommend-savings flow's analysis (oppen.cost.recommend over the run's record and its peers'
history, read from MLflow by tasks.run_records), called directly: no flow run, no artifact.
"""

from __future__ import annotations

import re

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field

from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound
from oppen.cost.recommend import recommend
from tasks.run_records import history_of, record_of

MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
FLOW_RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class RecommendationOut(BaseModel):
    model_config = ConfigDict(frozen=True)

    strategy: str = Field(description="early_stopping, batch_size, learning_rate, low_utilization, off_peak, spot "
                          "or right_sizing.")
    action: str = Field(description="What to change, in one sentence.")
    evidence: str = Field(description="The measurement behind it (this run's data or a peer run's).")
    saving_usd: float = Field(description="Estimated saving on a run like this one, in dollars.")
    saving_seconds: float = Field(description="Estimated time saved (negative: the cheaper way takes longer).")
    mlflow_run_id: str = Field(description="The MLflow run analysed.")


def recommend_cost_optimization(run_id: str) -> list[RecommendationOut]:
    """Every saving strategy with data behind it for a finished run (MLflow or flow run id), largest first."""
    client = context.mlflow()
    run = find_run(client, run_id)
    record = record_of(client, run)
    if record is None:
        raise NotFound(f"run {run.info.run_id} has no settled cost yet (still running, refused before it ran, or "
                       "not an Oppen training run); recommendations need a finished run")
    found = recommend(record, history_of(client, run), context.price_book())
    return [RecommendationOut(**item.model_dump(), mlflow_run_id=run.info.run_id) for item in found]


def find_run(client: MlflowClient, run_id: str) -> Run:
    """The MLflow run named by its own id, or by the flow run id it is tagged with (`prefect.flow_run_id`)."""
    value = str(run_id).strip().lower()
    if FLOW_RUN_ID.match(value):
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run_id` = '{value}'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
        if not runs:
            raise NotFound(f"no MLflow run is tagged with flow run {value}; it may not have reached training "
                           "(the flow run's state says why)")
        return runs[0]
    if not MLFLOW_RUN_ID.match(value):
        raise InvalidInput(f"{run_id!r} is neither an MLflow run id (32 hex digits) nor a flow run id (a UUID)")
    try:
        return client.get_run(value)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise NotFound(f"no MLflow run {value} in {_store(client)}; check the id and OPPEN_MLFLOW_TRACKING_URI") from None
        raise


def _store(client: MlflowClient) -> str:
    uri = client.tracking_uri
    return "this tracking store" if "@" in uri else uri  # never echo credentials
