"""Stable artifact keys: one per deployment and kind, so each run adds a version, not a new entry.

Prefect's Artifacts page lists one row per key, with every flow run's version under it. Keyed by
deployment (`train-mnist-local-cost`), a deployment's runs line up under four rows (summary, cost,
cost table, progress) that stay put, and each version still belongs to the flow run that made it.
A flow called outside a deployment uses its flow's name (`train-mnist-adhoc-cost`).
"""

from __future__ import annotations

import re

from prefect.runtime import deployment, flow_run


def artifact_key(kind: str) -> str:
    """`<flow>-<deployment>-<kind>`: lowercase letters, digits and dashes, as Prefect requires."""
    flow = flow_run.get_flow_name() or "flow"
    where = deployment.get_name() or "adhoc"
    key = re.sub(r"[^a-z0-9]+", "-", f"{flow}-{where}-{kind}".lower()).strip("-")
    return key[:100]
