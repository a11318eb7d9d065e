"""A training run's events (oppen/events.py), wired to Prefect's runtime: who the run is, where to find it."""

from __future__ import annotations

import logging
from uuid import UUID

from prefect.runtime import deployment, flow_run

from oppen.cost.price_book import PriceBook, Resources
from oppen.cost.recommend import SMALLER_GPU_UTILIZATION, gpu_advice
from oppen.cost.utilization import Utilization
from oppen.events import (
    GPU_UNDERUTILIZED,
    MODEL_PROMOTED,
    MODEL_REGISTERED,
    RunEventContext,
    emit,
    emit_run_event,
    model_event_id,
    model_resource,
)
from oppen.display import usd
from oppen.links import prefect_flow_run_url
from tasks.mlflow_tasks import TrackingInfo
from tasks.registry import RegisteredVersion

MLFLOW_TAG_PREFIX = "mlflow:"  # flow-run tag `mlflow:<experiment id>/<run id>`: automations link the MLflow run
COST_TAG_PREFIX = "cost:"  # flow-run tag `cost:$0.000351`, the run's settled cost, in Prefect's run header

log = logging.getLogger(__name__)


def prefect_run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI (prefect.runtime's own helper builds a path the UI does not serve)."""
    return prefect_flow_run_url(flow_run_id)


def run_event_context(team: str, experiment: str, workload: str) -> RunEventContext:
    run_id = flow_run.get_id()
    links = {}
    if run_id and (url := prefect_run_url(flow_run.get_id())):
        links["prefect"] = url
    return RunEventContext(flow_run_id=run_id, team=team, experiment=experiment, workload=workload,
                           flow_run_name=flow_run.get_name(), deployment_id=deployment.get_id(), links=links)


def link_mlflow_run(events: RunEventContext, info: TrackingInfo) -> None:
    """From here on the run's events name its MLflow run; the flow run is tagged so Prefect's own events can too."""
    events.mlflow_run_id = info.run_id
    if info.run_url:
        events.links["mlflow"] = info.run_url
    _retag(events.flow_run_id, MLFLOW_TAG_PREFIX, f"{info.experiment_id}/{info.run_id}")


def tag_cost(flow_run_id: str | None, cost_usd: float) -> None:
    """`cost:$0.000351` on the flow run: Prefect's run header and runs list show tags, not the state's message."""
    _retag(flow_run_id, COST_TAG_PREFIX, usd(cost_usd))


def _retag(flow_run_id: str | None, prefix: str, value: str) -> None:
    """Replace the flow run's `prefix...` tag, keeping every other tag as the server has them now."""
    if not flow_run_id:
        return
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(UUID(flow_run_id)).tags or []
            tags = [tag for tag in current if not tag.startswith(prefix)]
            client.update_flow_run(UUID(flow_run_id), tags=[*tags, f"{prefix}{value}"])
    except Exception as error:  # a label for people and alerts only: never worth failing a run over
        log.warning("could not tag the flow run with %s%s: %s", prefix, value, error)


def announce_registration(registered: RegisteredVersion, events: RunEventContext, mlflow_run_id: str) -> None:
    """`registered`, then `promoted` to its alias: the same ids MLflow's webhook receiver uses, so each counts once."""
    links = dict(events.links)
    related = events.related()
    emit(MODEL_REGISTERED, model_resource(registered.name, registered.version), related,
         {"name": registered.name, "version": registered.version, "alias": None, "run_id": mlflow_run_id,
          "source": "oppen-flow", "metric": registered.metric, "metric_value": registered.value, "links": links},
         event_id=model_event_id(MODEL_REGISTERED, registered.name, registered.version, None))
    emit(MODEL_PROMOTED, model_resource(registered.name, registered.version, registered.alias), related,
         {"name": registered.name, "version": registered.version, "alias": registered.alias, "replaced_version": None,
          "source": "oppen-flow", "metric": registered.metric, "metric_value": registered.value, "links": links},
         event_id=model_event_id(MODEL_PROMOTED, registered.name, registered.version, registered.alias))


def report_utilization(events: RunEventContext, book: PriceBook, resources: Resources, utilization: Utilization | None,
                       seconds: float) -> dict | None:
    """A GPU run that used its GPUs below the recommender's threshold: an event with the recommender's advice."""
    if not resources.gpus or utilization is None or utilization.gpu_util_mean is None:
        return None
    if utilization.gpu_util_mean >= SMALLER_GPU_UTILIZATION:
        return None
    advice = gpu_advice(resources, utilization.gpu_util_mean, seconds, book)
    payload = {
        "gpu_utilization": utilization.gpu_util_mean, "threshold": SMALLER_GPU_UTILIZATION, "gpus": resources.gpus,
        "gpu_type": resources.gpu_type,
        "advice": (f"{advice.action}: saves about ${advice.saving_usd:.2f} on a run like this ({advice.evidence})"
                   if advice else "no cheaper device in the price book; a smaller batch or fewer GPUs may fit"),
        "saving_usd": advice.saving_usd if advice else 0.0,
    }
    emit_run_event(events, GPU_UNDERUTILIZED, payload)
    return payload
