"""Links into the two UIs, built one way everywhere (logs, summaries, Slack, events, the API).

MLflow 3's UI opens in its GenAI mode, whose experiment page is a traces overview: a training run
linked plainly lands there. `workflowType=machine_learning` opens the model-training view instead
(the same switch as the toggle in its sidebar), so every MLflow link carries it.
"""

from __future__ import annotations

from oppen.tracking_keys import MODEL_TRAINING_VIEW


def mlflow_experiment_url(ui_url: str | None, experiment_id: str) -> str | None:
    """The experiment's runs, in the model-training view."""
    if not ui_url:
        return None
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW}"


def mlflow_run_url(ui_url: str | None, experiment_id: str, run_id: str) -> str | None:
    """One run's overview (its description, params, metrics), in the model-training view."""
    if not ui_url:
        return None
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{MODEL_TRAINING_VIEW}"


def prefect_flow_run_url(flow_run_id: str | None) -> str | None:
    """The flow run in the Prefect UI named by PREFECT_UI_URL (derived from PREFECT_API_URL when unset)."""
    if not flow_run_id:
        return None
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id)
