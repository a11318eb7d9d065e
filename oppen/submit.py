"""Submit a deployment run after checking it: pool, queue and job variables against the pools
file, and (for the Kubernetes pool, when asked) GPU capacity and team quota in the cluster.

Nothing is created on the server, and nothing is spent, until every check passes.
"""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

from work_pools.gpu_capacity import Verdict, judge, read_cluster
from work_pools.job_variables import check_request, template_defaults
from work_pools.render import deployment_job_variables, deployment_label, prefect_yaml_deployments
from work_pools.spec import load_pools


def check_priced_as_scheduled(parameters: dict[str, Any], variables: dict[str, Any], template: dict[str, Any]) -> None:
    """On Kubernetes the pod's GPUs and capacity class must be what the cost engine prices, or a
    run quoted for 0 GPUs (or on-demand) would hold a GPU (or spot capacity) unbilled."""
    pod = template_defaults(template) | variables
    cost = (parameters or {}).get("cost") or {}
    resources = cost.get("resources") or {}
    priced = (resources.get("gpus", 0), resources.get("gpu_type"), bool(cost.get("spot", False)))
    scheduled = (pod["gpu_count"], pod["gpu_type"], bool(pod["spot"]))
    if priced != scheduled:
        raise ValueError(
            f"the run is priced as gpus={priced[0]}, gpu_type={priced[1]}, spot={priced[2]} (parameter cost) but its pod "
            f"asks for gpu_count={scheduled[0]}, gpu_type={scheduled[1]}, spot={scheduled[2]} (job variables); make them agree"
        )


def check_prefect_yaml() -> list[str]:
    """Every deployment of prefect.yaml against the pools file; one line per deployment checked."""
    pools = load_pools()
    checked = []
    for deployment in prefect_yaml_deployments():
        pool = deployment["work_pool"]
        queue = pool.get("work_queue_name")
        label = deployment_label(deployment)
        try:
            variables = deployment_job_variables(deployment)
            spec, template = check_request(pools, pool["name"], queue, variables)
            if spec.type == "kubernetes":
                check_priced_as_scheduled(deployment.get("parameters") or {}, variables, template)
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        checked.append(f"{label}: pool {pool['name']}, queue {queue}: ok")
    return checked


async def _cluster_verdict(variables: dict[str, Any], template: dict[str, Any]) -> Verdict:
    from kubernetes_asyncio import client, config

    effective = template_defaults(template) | variables
    await config.load_kube_config()
    async with client.ApiClient() as api:
        nodes, quotas = await read_cluster(api)
    return judge(nodes, quotas, gpu_count=effective["gpu_count"], gpu_type=effective["gpu_type"],
                 spot=bool(effective["spot"]), namespace=effective["namespace"])


async def submit(
    name: str, parameters: dict[str, Any] | None = None, job_variables: dict[str, Any] | None = None,
    queue: str | None = None, check_cluster: bool = False,
) -> tuple[str, Verdict | None]:
    """Check, then create the flow run (without waiting for it). Returns its id and the cluster verdict."""
    overrides = job_variables or {}
    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
    pools = load_pools()
    variables = (deployment.job_variables or {}) | overrides
    pool, template = check_request(pools, deployment.work_pool_name, queue or deployment.work_queue_name, variables)
    if pool.type == "kubernetes":
        check_priced_as_scheduled((deployment.parameters or {}) | (parameters or {}), variables, template)
    verdict = await _cluster_verdict(variables, template) if check_cluster and pool.type == "kubernetes" else None
    flow_run = await run_deployment(name, parameters=parameters or {}, job_variables=overrides,
                                    work_queue_name=queue, timeout=0, as_subflow=False)
    return str(flow_run.id), verdict
