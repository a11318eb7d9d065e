"""Oppen's event catalog: every Prefect event Oppen emits, its resource, related resources and payload.

Automations (automations.yaml), deployment triggers (prefect.yaml), Slack messages and the README
all read these names from here. Three kinds of primary resource:

- a run: `oppen.run.<flow run id>`, labelled with its team, experiment and workload;
- a model: `oppen.model.<name>`, labelled with the version and, for alias events, the alias, so an
  automation can match "a version got `development`" on labels alone (triggers cannot match payloads);
- an alert: `oppen.alert.<alertname>` (a Prometheus alert of infra/monitoring/rules, delivered by
  Alertmanager to oppen/alerts), labelled with its severity, fingerprint, team and every alert label.

Related resources name the flow run, its deployment, the team, the experiment and the MLflow run,
each with a `prefect.resource.role`. Payloads carry the figures (dollars as floats, fractions 0-1)
and `links` to the Prefect and MLflow UIs where they are known.

Model events carry deterministic ids: the training flow and the MLflow webhook receiver both see
the same registration, and Prefect keeps one event per id, so a trigger fires once. Alert events do
too: Alertmanager retries a delivery and repeats a firing alert, and each must reach Prefect once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

BUDGET_WARNING = "oppen.budget.warning"
BUDGET_REFUSED = "oppen.budget.refused"
BUDGET_STOPPED = "oppen.budget.stopped"
COST_THRESHOLD = "oppen.cost.threshold"
COST_SETTLED = "oppen.cost.settled"
MODEL_REGISTERED = "oppen.model.registered"
MODEL_PROMOTED = "oppen.model.promoted"
TRAINING_SLOW = "oppen.training.slow"
GPU_UNDERUTILIZED = "oppen.gpu.underutilized"
NOTIFICATION_FAILED = "oppen.notification.failed"
ALERT_FIRING = "oppen.alert.firing"
ALERT_RESOLVED = "oppen.alert.resolved"


@dataclass(frozen=True)
class EventSpec:
    resource: str  # "run", "model" or "alert"
    when: str
    payload: tuple[str, ...]


# An alert's payload: its annotations and figures as the rule wrote them (infra/monitoring/rules).
ALERT_PAYLOAD = ("alertname", "status", "severity", "summary", "description", "runbook_url", "starts_at", "ends_at",
                 "value", "labels", "fingerprint", "links")

CATALOG: dict[str, EventSpec] = {
    BUDGET_WARNING: EventSpec("run", "a reservation takes a team or experiment budget past its warning fraction",
                              ("scope", "amount_usd", "used_usd", "request_usd", "fraction", "links")),
    BUDGET_REFUSED: EventSpec("run", "a request is refused by a budget or its cap, before it spends anything",
                              ("reason", "stage", "quote_usd", "links")),
    BUDGET_STOPPED: EventSpec("run", "the meter stopped a run at its cap or at a budget's headroom",
                              ("reason", "cost_usd", "cap_usd", "budget_fraction", "links")),
    COST_THRESHOLD: EventSpec("run", "a running run's cost crosses 50/70/90% of its cap or of a budget",
                              ("fraction", "of", "accrued_usd", "of_usd", "links")),
    COST_SETTLED: EventSpec("run", "an attempt's cost is booked in the ledger (once per attempt)",
                            ("status", "cost_usd", "run_cost_usd", "cap_usd", "quote_usd", "attempt", "metric",
                             "metric_value", "links")),
    MODEL_REGISTERED: EventSpec("model", "a new model version exists in the registry (by a flow or in MLflow)",
                                ("name", "version", "alias", "run_id", "source", "links")),
    MODEL_PROMOTED: EventSpec("model", "a model version gets an alias: `development` (registration into the lifecycle), "
                              "`staging`, `production` (by a flow, promote-model or in MLflow)",
                              ("name", "version", "alias", "replaced_version", "source", "links")),
    TRAINING_SLOW: EventSpec("run", "an epoch takes over 2x the time this request's history expects",
                             ("epoch", "epoch_seconds", "expected_seconds", "ratio", "links")),
    GPU_UNDERUTILIZED: EventSpec("run", "a finished GPU run used its GPUs below the recommender's threshold",
                                 ("gpu_utilization", "threshold", "gpus", "advice", "links")),
    NOTIFICATION_FAILED: EventSpec("run", "a Slack message could not be delivered (after its retries)",
                                   ("channel", "error", "message_kind", "links")),
    ALERT_FIRING: EventSpec("alert", "Alertmanager reports an Oppen alert firing (once per alert and start)",
                            ALERT_PAYLOAD),
    ALERT_RESOLVED: EventSpec("alert", "Alertmanager reports that an Oppen alert stopped firing", ALERT_PAYLOAD),
}


def run_resource_id(flow_run_id: str) -> str:
    return f"oppen.run.{flow_run_id}"


def model_resource(name: str, version: int | str, alias: str | None = None) -> dict[str, str]:
    resource = {"prefect.resource.id": f"oppen.model.{name}", "prefect.resource.name": name,
                "oppen.model.name": name, "oppen.model.version": str(version)}
    if alias:
        resource["oppen.model.alias"] = alias
    return resource


def model_event_id(event: str, name: str, version: int | str, alias: str | None) -> uuid.UUID:
    """The same registration or alias move gets the same id, whoever reports it (flow or MLflow webhook)."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{event}/{name}/{version}/{alias or ''}")


def alert_event_id(fingerprint: str, status: str, starts_at: datetime) -> uuid.UUID:
    """One id per alert (fingerprint), start and status: Alertmanager's retries and repeats of it are one event."""
    started = starts_at.astimezone(timezone.utc).isoformat()
    return uuid.uuid5(uuid.NAMESPACE_URL, f"oppen.alert/{fingerprint}/{status}/{started}")


@dataclass
class RunEventContext:
    """Who a run's events are about; the MLflow run id is filled in once the tracking run opens."""

    flow_run_id: str | None
    team: str
    experiment: str
    workload: str
    flow_run_name: str | None = None
    deployment_id: str | None = None
    mlflow_run_id: str | None = None
    links: dict[str, str] = field(default_factory=dict)

    def resource(self) -> dict[str, str]:
        resource = {"prefect.resource.id": run_resource_id(self.flow_run_id or "adhoc"), "oppen.team": self.team,
                    "oppen.experiment": self.experiment, "oppen.workload": self.workload}
        if self.flow_run_name:
            resource["prefect.resource.name"] = self.flow_run_name
        return resource

    def related(self) -> list[dict[str, str]]:
        related = []
        if self.flow_run_id:
            related.append({"prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                            "prefect.resource.role": "flow-run"})
        if self.deployment_id:
            related.append({"prefect.resource.id": f"prefect.deployment.{self.deployment_id}",
                            "prefect.resource.role": "deployment"})
        related.append({"prefect.resource.id": f"oppen.team.{self.team}", "prefect.resource.role": "team"})
        related.append({"prefect.resource.id": f"oppen.experiment.{self.experiment}",
                        "prefect.resource.role": "experiment"})
        if self.mlflow_run_id:
            related.append({"prefect.resource.id": f"mlflow.run.{self.mlflow_run_id}",
                            "prefect.resource.role": "mlflow-run"})
        return related


def emit(name: str, resource: dict[str, str], related: list[dict[str, str]], payload: dict[str, Any],
         event_id: uuid.UUID | None = None) -> None:
    """Emit a catalogued event (an unknown name is a programming error, caught by the tests)."""
    from prefect.events import emit_event

    if name not in CATALOG:
        raise ValueError(f"{name!r} is not in Oppen's event catalog")
    emit_event(event=name, resource=resource, related=related, payload=payload, id=event_id)


def emit_run_event(context: RunEventContext, name: str, payload: dict[str, Any]) -> None:
    emit(name, context.resource(), context.related(), {**payload, "links": dict(context.links)})
