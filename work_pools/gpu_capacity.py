"""GPU availability per type, and whether a GPU request can run, from the cluster's own objects.

Free GPUs on a node = its allocatable `nvidia.com/gpu` minus what the pods bound to it request
(pods that finished hold nothing). A run's GPUs must all be on one node, so a request larger
than the largest node of its type can never start, and one larger than the team's ResourceQuota
can never be admitted: both are refused before a flow run is created. A request that fits but
not right now is accepted and waits in its queue.

The arithmetic works on kubernetes client models (kubernetes_asyncio, the client prefect-kubernetes
uses); `read_cluster` fetches them with the worker's read-only ClusterRole (infra/base/worker-rbac.yaml).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from work_pools.kubernetes_template import GPU_PRODUCT_LABEL, SPOT_LABEL

GPU_RESOURCE = "nvidia.com/gpu"
QUOTA_KEYS = (f"requests.{GPU_RESOURCE}", GPU_RESOURCE)
TERMINAL_PHASES = {"Succeeded", "Failed"}


class GpuRequestRefused(ValueError):
    """The request can never run here: no such GPU type, no node that large, or over the team quota."""


def _count(quantity: Any) -> int:
    # GPUs are whole devices: the API reports them as plain integers ("4").
    if quantity in (None, ""):
        return 0
    return int(str(quantity))


def _container_gpus(container) -> int:
    resources = container.resources
    if resources is None:
        return 0
    # Extended resources cannot be overcommitted: a limit alone implies an equal request.
    requested = (resources.requests or {}).get(GPU_RESOURCE)
    return _count(requested if requested is not None else (resources.limits or {}).get(GPU_RESOURCE))


def pod_gpus(pod) -> int:
    """GPUs a pod holds on its node: its containers together, or its largest init container."""
    spec = pod.spec
    running = sum(_container_gpus(c) for c in spec.containers or [])
    init = max((_container_gpus(c) for c in spec.init_containers or []), default=0)
    return max(running, init)


def _ready(node) -> bool:
    if node.spec is not None and node.spec.unschedulable:
        return False
    conditions = (node.status.conditions if node.status else None) or []
    return any(c.type == "Ready" and c.status == "True" for c in conditions)


@dataclass(frozen=True)
class NodeGpus:
    name: str
    gpu_type: str
    spot: bool
    allocatable: int
    used: int
    ready: bool

    @property
    def free(self) -> int:
        return max(0, self.allocatable - self.used) if self.ready else 0


@dataclass(frozen=True)
class TypeAvailability:
    gpu_type: str
    nodes: int
    allocatable: int
    used: int
    free: int
    largest_node: int  # GPUs on the largest node: the most one run can ever get
    largest_free: int  # the most one run can get right now


@dataclass(frozen=True)
class QuotaUse:
    namespace: str
    hard: int
    used: int

    @property
    def left(self) -> int:
        return max(0, self.hard - self.used)


@dataclass(frozen=True)
class Verdict:
    starts_now: bool
    reason: str
    availability: TypeAvailability | None = None
    quota: QuotaUse | None = None
    notes: list[str] = field(default_factory=list)


def node_gpus(nodes, pods) -> list[NodeGpus]:
    used: dict[str, int] = defaultdict(int)
    for pod in pods:
        if pod.spec is None or not pod.spec.node_name:
            continue  # pending pods hold nothing yet
        if pod.status is not None and pod.status.phase in TERMINAL_PHASES:
            continue
        used[pod.spec.node_name] += pod_gpus(pod)
    result = []
    for node in nodes:
        allocatable = _count(((node.status.allocatable if node.status else None) or {}).get(GPU_RESOURCE))
        if allocatable == 0:
            continue
        labels = node.metadata.labels or {}
        result.append(NodeGpus(
            name=node.metadata.name, gpu_type=labels.get(GPU_PRODUCT_LABEL, "unknown"),
            spot=labels.get(SPOT_LABEL) == "spot-True", allocatable=allocatable,
            used=used.get(node.metadata.name, 0), ready=_ready(node),
        ))
    return result


def availability(nodes: list[NodeGpus], spot: bool | None = None) -> dict[str, TypeAvailability]:
    """Per GPU type; `spot` narrows to spot (True) or on-demand (False) nodes."""
    by_type: dict[str, list[NodeGpus]] = defaultdict(list)
    for node in nodes:
        if spot is None or node.spot == spot:
            by_type[node.gpu_type].append(node)
    return {
        gpu_type: TypeAvailability(
            gpu_type=gpu_type, nodes=len(group), allocatable=sum(n.allocatable for n in group),
            used=sum(n.used for n in group), free=sum(n.free for n in group),
            largest_node=max(n.allocatable for n in group), largest_free=max(n.free for n in group),
        )
        for gpu_type, group in sorted(by_type.items())
    }


def quota_use(quotas, namespace: str) -> QuotaUse | None:
    """The tightest GPU quota of a namespace (hard and used as the quota controller last counted)."""
    tightest = None
    for quota in quotas:
        if quota.metadata.namespace != namespace or quota.status is None:
            continue
        hard, used = quota.status.hard or {}, quota.status.used or {}
        for key in QUOTA_KEYS:
            if key in hard:
                candidate = QuotaUse(namespace, _count(hard[key]), _count(used.get(key)))
                if tightest is None or candidate.left < tightest.left:
                    tightest = candidate
    return tightest


def judge(nodes: list[NodeGpus], quotas, *, gpu_count: int, gpu_type: str, spot: bool, namespace: str) -> Verdict:
    """Refuse what can never run (GpuRequestRefused); otherwise say whether it starts now or waits."""
    capacity = "spot" if spot else "on-demand"
    table = availability(nodes, spot=spot)
    kind = table.get(gpu_type)
    if kind is None:
        known = ", ".join(f"{t} ({a.allocatable})" for t, a in table.items()) or "none"
        raise GpuRequestRefused(f"no {capacity} node has {GPU_PRODUCT_LABEL}={gpu_type}; {capacity} GPU types here: {known}")
    if gpu_count > kind.largest_node:
        raise GpuRequestRefused(
            f"{gpu_count} x {gpu_type} requested, but the largest {capacity} {gpu_type} node has {kind.largest_node}: "
            f"a run's GPUs must be on one node (ask for at most {kind.largest_node})"
        )
    quota = quota_use(quotas, namespace)
    if quota is not None and gpu_count > quota.hard:
        raise GpuRequestRefused(
            f"{gpu_count} GPUs requested, but the quota of namespace {namespace} allows {quota.hard} at once"
        )
    notes = []
    if quota is not None and gpu_count > quota.left:
        notes.append(f"quota of {namespace}: {quota.used} of {quota.hard} GPUs in use, {quota.left} left")
    if gpu_count > kind.largest_free:
        notes.append(f"no {capacity} {gpu_type} node has {gpu_count} free GPUs now (most free on one node: {kind.largest_free})")
    if notes:
        return Verdict(False, "waits in its queue: " + "; ".join(notes), kind, quota, notes)
    return Verdict(True, f"fits now: {kind.largest_free} {gpu_type} free on one node", kind, quota)


async def read_cluster(api_client) -> tuple[list[NodeGpus], list]:
    """Nodes with GPUs (and what is used on them) plus all ResourceQuotas, through the kubernetes client."""
    from kubernetes_asyncio.client import CoreV1Api

    core = CoreV1Api(api_client)
    nodes = (await core.list_node()).items
    pods = (await core.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed")).items
    quotas = (await core.list_resource_quota_for_all_namespaces()).items
    return node_gpus(nodes, pods), quotas
