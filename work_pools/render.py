"""Render the Kubernetes Job a flow run would get, with prefect-kubernetes' own code, offline.

`KubernetesWorkerJobConfiguration.from_template_and_values` + `prepare_for_flow_run` are what the
worker itself calls before it submits a Job; nothing here re-implements templating. The result is
validated against the Kubernetes OpenAPI schema (kubernetes-validate) so a template change that
would make the API server refuse every Job fails here first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any
from uuid import uuid4

import kubernetes_validate
import yaml
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

from work_pools.spec import HERE

PROJECT_DIR = HERE.parent
KUBERNETES_VERSION = "1.32"  # the oldest minor the manifests target (the kubectl client here is 1.32)
# Where the worker gets deploy-time step outputs from; a render outside `prefect deploy` substitutes these.
STEP_OUTPUTS = {"{{ build-image.stdout }}": "registry.example.com/oppen-train:render"}


async def render_job_manifest(
    template: dict[str, Any], job_variables: dict[str, Any], client: PrefectClient, flow_run: FlowRun | None = None,
) -> dict[str, Any]:
    """The Job manifest the worker would submit for `flow_run` with these job variables."""
    configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
        template, job_variables, client=client
    )
    flow_run = flow_run or FlowRun(id=uuid4(), name="render-preview", flow_id=uuid4())
    configuration.prepare_for_flow_run(flow_run)
    return configuration.job_manifest


def validate_manifest(manifest: dict[str, Any], version: str = KUBERNETES_VERSION) -> None:
    """Raise kubernetes_validate.ValidationError when the API server's schema would refuse it."""
    kubernetes_validate.validate(manifest, version, strict=True)


def prefect_yaml_deployments(path: Path = PROJECT_DIR / "prefect.yaml") -> list[dict[str, Any]]:
    """prefect.yaml's deployments with anchors and merge keys resolved (as `prefect deploy` reads them)."""
    return yaml.safe_load(Path(path).read_text())["deployments"]


def deployment_job_variables(deployment: dict[str, Any]) -> dict[str, Any]:
    variables = copy.deepcopy(deployment.get("work_pool", {}).get("job_variables") or {})
    return {key: STEP_OUTPUTS.get(value, value) if isinstance(value, str) else value for key, value in variables.items()}


def deployment_label(deployment: dict[str, Any]) -> str:
    flow = deployment["entrypoint"].rsplit(":", 1)[1].replace("_", "-")
    return f"{flow}/{deployment['name']}"
