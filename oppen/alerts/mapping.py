"""An Alertmanager notification as Oppen's Prefect events: one `oppen.alert.firing` or `oppen.alert.resolved`
per alert, pure (no I/O), so every rule of the mapping is a unit test.

Triggers see only resource labels, so the labels an automation may want to match go on the resource:
the severity, the fingerprint, the team, experiment and workload (under the same keys a run's own
events use, so team channels and owners work alike), and every alert label as `oppen.alert.label.<name>`.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

from oppen.alerts.payload import Alert, WebhookPayload
from oppen.events import ALERT_FIRING, ALERT_RESOLVED, alert_event_id
from oppen.mlflow_webhooks import PrefectEventSpec

# Alert labels that name what a run's events name with the same resource labels.
RUN_LABELS = {"team": "oppen.team", "experiment": "oppen.experiment", "workload": "oppen.workload"}
LABEL_PREFIX = "oppen.alert.label."


def events_for(payload: WebhookPayload) -> list[PrefectEventSpec]:
    """The events one notification stands for, in its alerts' order."""
    return [event_for(alert, payload.external_url) for alert in payload.alerts]


def event_for(alert: Alert, alertmanager_url: str = "") -> PrefectEventSpec:
    firing = alert.status == "firing"
    return PrefectEventSpec(
        event=ALERT_FIRING if firing else ALERT_RESOLVED,
        resource=_resource(alert),
        related=_related(alert),
        payload=_payload(alert, alertmanager_url),
        id=alert_event_id(alert.fingerprint, alert.status, alert.starts_at),
        # When it happened: the start for a firing alert, the end for a resolved one (not when it arrived,
        # which a retried or repeated notification would move).
        occurred=alert.starts_at if firing else alert.ends_at,
    )


def _resource(alert: Alert) -> dict[str, str]:
    resource = {"prefect.resource.id": f"oppen.alert.{alert.name}", "prefect.resource.name": alert.name,
                "oppen.alert.severity": alert.labels.get("severity", "none"),
                "oppen.alert.fingerprint": alert.fingerprint}
    resource |= {key: alert.labels[label] for label, key in RUN_LABELS.items() if alert.labels.get(label)}
    resource |= {f"{LABEL_PREFIX}{label}": value for label, value in sorted(alert.labels.items())}
    return resource


def _related(alert: Alert) -> list[dict[str, str]]:
    related = []
    flow_run_id = alert.labels.get("flow_run_id")
    if flow_run_id and _is_uuid(flow_run_id):
        # Prefect's automations read the flow run named here (a template's `flow_run`): a run id that is
        # not a UUID would make that lookup fail, so it stays a label only.
        related += [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"},
                    {"prefect.resource.id": f"oppen.run.{flow_run_id}", "prefect.resource.role": "run"}]
    if team := alert.labels.get("team"):
        related.append({"prefect.resource.id": f"oppen.team.{team}", "prefect.resource.role": "team"})
    if experiment := alert.labels.get("experiment"):
        related.append({"prefect.resource.id": f"oppen.experiment.{experiment}", "prefect.resource.role": "experiment"})
    return related


def _payload(alert: Alert, alertmanager_url: str) -> dict[str, Any]:
    notes = alert.annotations
    runbook = notes.get("runbook_url")
    links = {"runbook": runbook, "prometheus": alert.generator_url, "alertmanager": alertmanager_url}
    return {
        "alertname": alert.name,
        "status": alert.status,
        "severity": alert.labels.get("severity"),
        "summary": notes.get("summary"),
        "description": notes.get("description"),
        "runbook_url": runbook,
        "starts_at": alert.starts_at.isoformat(),
        "ends_at": alert.ends_at.isoformat() if alert.status == "resolved" else None,
        "value": _number(notes.get("value")),
        "labels": dict(alert.labels),
        "fingerprint": alert.fingerprint,
        "links": {name: url for name, url in links.items() if url and url.startswith(("http://", "https://"))},
    }


def _number(text: str | None) -> float | None:
    """The rule's `value` annotation ({{ $value }}) as a number; JSON has no NaN or infinity, so those are None."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True
