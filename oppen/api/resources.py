"""get_gpu_availability, and the checks of a request against its pool, its pools-file entry and the cluster.

Where GPUs come from depends on where runs go. With a kube context (KUBECONFIG, else ~/.kube/config)
the cluster is read with the worker's own arithmetic (`work_pools.gpu_capacity`): GPUs per type,
spot and on-demand apart, and the namespaces' GPU quotas. Without one, runs go to the local process
pool, so this machine is described: its CUDA devices (torch; utilisation through nvidia-ml-py when it
is installed), its CPU cores and memory (psutil). A kube context whose cluster does not answer is an
error, never a silent fall back to the local machine: the answer would describe the wrong place.

How many runs can run at once is Prefect's to say (the pool's and its queues' concurrency limits,
the `gpu-slots` limit, the workers polling); when no Prefect server answers, that part is left out.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field

from oppen.api import context
from oppen.api.errors import ApiError, Unavailable
from tasks.gpu_slots import GPU_SLOTS_LIMIT
from work_pools.gpu_capacity import NodeGpus, QUOTA_KEYS, Verdict, availability, judge, quota_use, read_cluster
from work_pools.job_variables import template_defaults
from work_pools.spec import load_pools

GIB = 1024**3
CLUSTER_TIMEOUT_S = 20.0  # three list calls; a cluster slower than this is reported as not answering
T = TypeVar("T")


# --- the models ------------------------------------------------------------------------------


class GpuTypeRow(BaseModel):
    """One GPU type on one kind of capacity in the cluster."""

    model_config = ConfigDict(frozen=True)

    gpu_type: str = Field(description="The nodes' nvidia.com/gpu.product label (e.g. NVIDIA-L4).")
    capacity: Literal["spot", "on-demand"] = Field(description="Spot nodes (oppen.io/spot=spot-True) or on-demand ones.")
    nodes: int = Field(description="Nodes of this type with allocatable GPUs.")
    allocatable: int = Field(description="GPUs the nodes offer in all.")
    used: int = Field(description="GPUs requested by the pods bound to them (finished pods excluded).")
    free: int = Field(description="GPUs free on ready nodes now.")
    largest_node: int = Field(description="GPUs on the largest node: the most one run can ever get.")
    largest_free: int = Field(description="The most free GPUs on one node: the most one run can get now.")


class GpuQuota(BaseModel):
    """The tightest GPU ResourceQuota of one namespace."""

    model_config = ConfigDict(frozen=True)

    namespace: str = Field(description="Kubernetes namespace (one per team).")
    hard: int = Field(description="GPUs the quota allows at once.")
    used: int = Field(description="GPUs it counts as in use.")
    left: int = Field(description="GPUs a new run of this namespace can still request.")


class LocalGpu(BaseModel):
    """One CUDA device of this machine."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(description="The torch device index (cuda:N).")
    name: str = Field(description="The device's product name.")
    memory_total_gib: float = Field(description="Device memory in GiB.")
    memory_free_gib: float = Field(description="Device memory free now (all processes), in GiB.")
    utilization: float | None = Field(description="GPU busy fraction over NVML's last sample (0..1); None "
                                      "without nvidia-ml-py.")
    memory_utilization: float | None = Field(description="Memory-controller busy fraction (0..1); None without "
                                             "nvidia-ml-py.")


class PoolSlots(BaseModel):
    """How many runs a work pool lets run at once, as its Prefect server says."""

    model_config = ConfigDict(frozen=True)

    pool: str = Field(description="Work pool name.")
    pool_limit: int | None = Field(description="Flow runs the pool runs at once; None: no pool limit (each "
                                   "worker's own limit applies).")
    queue_limits: dict[str, int | None] = Field(description="Each queue's limit (None: none of its own).")
    running: int = Field(description="Flow runs of the pool pending or running now.")
    workers_online: int = Field(description="Workers polling the pool now; with none, nothing starts.")
    can_start: int | None = Field(description="Runs that could still start now under the pool limit; None: "
                                  "no pool limit.")


class GpuSlots(BaseModel):
    """The `gpu-slots` global limit: one slot per GPU a running flow holds, across pools and queues."""

    model_config = ConfigDict(frozen=True)

    limit: int = Field(description="Slots in all (set to the GPUs the platform has).")
    active: int = Field(description="Slots held by running flows now.")


class GpuAvailability(BaseModel):
    """GPUs (and for the local machine, CPU and memory) where runs go, and how many runs can run at once."""

    model_config = ConfigDict(frozen=True)

    source: Literal["kubernetes", "local"] = Field(description="kubernetes: read from the current kube context's "
                                                   "cluster; local: this machine (no kube context).")
    kube_context: str | None = Field(description="The kube context read (kubernetes only).")
    gpu_types: list[GpuTypeRow] = Field(description="Per GPU type and capacity (kubernetes only).")
    quotas: list[GpuQuota] = Field(description="Namespaces with a GPU quota (kubernetes only).")
    devices: list[LocalGpu] = Field(description="CUDA devices of this machine (local only).")
    cpu_cores: int | None = Field(description="Logical CPU cores of this machine (local only).")
    cpu_cores_usable: int | None = Field(description="Cores this process may run on (CPU affinity, e.g. a "
                                         "container's cpuset) (local only).")
    load_1m: float | None = Field(description="One-minute load average (local only).")
    memory_total_gib: float | None = Field(description="Memory of this machine in GiB (local only).")
    memory_available_gib: float | None = Field(description="Memory available now in GiB (local only).")
    pools: list[PoolSlots] = Field(description="The pools runs go to here, with their limits; empty when no "
                                   "Prefect server answered.")
    gpu_slots: GpuSlots | None = Field(description="The gpu-slots limit; None when the server has none or did "
                                       "not answer.")
    notes: list[str] = Field(description="What could not be read, and why.")
    summary: str = Field(description="One line for a person.")


# --- get_gpu_availability ------------------------------------------------------------------


def get_gpu_availability(spot: bool | None = None) -> GpuAvailability:
    """Free GPUs per type in the current kube context's cluster, else this machine's devices, CPU and memory.

    `spot` narrows the cluster's rows to spot (True) or on-demand (False) nodes; it does not apply to
    the local machine. With a kube context the cluster must answer (Unavailable otherwise).
    """
    config_file = kube_config_file()
    if config_file is not None:
        nodes, quotas, name = read_kube_cluster(config_file)
        rows = gpu_type_rows(nodes, spot)
        limits = run_limits("kubernetes")
        return GpuAvailability(
            source="kubernetes", kube_context=name, gpu_types=rows, quotas=gpu_quotas(quotas), devices=[],
            cpu_cores=None, cpu_cores_usable=None, load_1m=None, memory_total_gib=None, memory_available_gib=None,
            pools=limits.pools, gpu_slots=limits.gpu_slots, notes=limits.notes, summary=_cluster_summary(name, rows),
        )
    devices, notes = local_gpus()
    limits = run_limits("process")
    memory = _psutil().virtual_memory()
    return GpuAvailability(
        source="local", kube_context=None, gpu_types=[], quotas=[], devices=devices,
        cpu_cores=_psutil().cpu_count(logical=True), cpu_cores_usable=_usable_cores(), load_1m=_load(),
        memory_total_gib=memory.total / GIB, memory_available_gib=memory.available / GIB,
        pools=limits.pools, gpu_slots=limits.gpu_slots, notes=notes + limits.notes,
        summary=_local_summary(devices, memory),
    )


# --- the cluster ---------------------------------------------------------------------------


def kube_config_file() -> str | None:
    """The kube config a kubectl here would use: $KUBECONFIG (paths joined by ':'), else ~/.kube/config.

    Read when asked, not at import: kubernetes_asyncio fixes its default path when it is imported.
    """
    configured = os.environ.get("KUBECONFIG", "")
    paths = [Path(part).expanduser() for part in configured.split(os.pathsep) if part.strip()]
    if not paths:
        paths = [Path("~/.kube/config").expanduser()]
    present = [str(path) for path in paths if path.is_file()]
    return os.pathsep.join(present) if present else None


def read_kube_cluster(config_file: str) -> tuple[list[NodeGpus], list, str | None]:
    """GPU nodes (with what is used on them) and ResourceQuotas, through a client of its own (the process's
    default kubernetes configuration is left alone)."""
    from kubernetes_asyncio import config

    async def read() -> tuple[list[NodeGpus], list, str | None]:
        try:
            _, active = config.list_kube_config_contexts(config_file=config_file)
            api = await config.new_client_from_config(config_file=config_file)
        except (config.ConfigException, OSError, ValueError, TypeError) as error:
            raise Unavailable(f"the kube config {config_file} cannot be used ({error}); fix it, or unset KUBECONFIG "
                              "(and move ~/.kube/config) to describe this machine instead") from None
        async with api:
            nodes, quotas = await asyncio.wait_for(read_cluster(api), CLUSTER_TIMEOUT_S)
        return nodes, quotas, (active or {}).get("name")

    try:
        return run_async(read)
    except ApiError:
        raise
    except Exception as error:  # unreachable API server, expired credentials, RBAC: said in one sentence
        raise Unavailable(f"the cluster of the kube context in {config_file} did not answer "
                          f"({type(error).__name__}: {_first_line(error)}); check `kubectl get nodes`, or unset "
                          "KUBECONFIG to describe this machine instead") from None


def gpu_type_rows(nodes: list[NodeGpus], spot: bool | None = None) -> list[GpuTypeRow]:
    """`availability` per capacity kind: spot and on-demand nodes are priced and scheduled apart."""
    rows = []
    for on_spot in ([spot] if spot is not None else [False, True]):
        for kind in availability(nodes, spot=on_spot).values():
            rows.append(GpuTypeRow(
                gpu_type=kind.gpu_type, capacity="spot" if on_spot else "on-demand", nodes=kind.nodes,
                allocatable=kind.allocatable, used=kind.used, free=kind.free, largest_node=kind.largest_node,
                largest_free=kind.largest_free,
            ))
    return rows


def gpu_quotas(quotas: list) -> list[GpuQuota]:
    namespaces = sorted({quota.metadata.namespace for quota in quotas
                         if quota.status is not None and any(key in (quota.status.hard or {}) for key in QUOTA_KEYS)})
    found = [quota_use(quotas, namespace) for namespace in namespaces]
    return [GpuQuota(namespace=use.namespace, hard=use.hard, used=use.used, left=use.left) for use in found if use]


def cluster_verdict(config_file: str, variables: dict[str, Any], template: dict[str, Any]) -> Verdict:
    """Whether a Kubernetes pool request can start now, waits, or can never run (GpuRequestRefused)."""
    effective = template_defaults(template) | variables
    nodes, quotas, _ = read_kube_cluster(config_file)
    return judge(nodes, quotas, gpu_count=effective["gpu_count"], gpu_type=effective["gpu_type"],
                 spot=bool(effective["spot"]), namespace=effective["namespace"])


def _cluster_summary(name: str | None, rows: list[GpuTypeRow]) -> str:
    where = f"kube context {name}" if name else "the cluster"
    if not rows:
        return f"{where}: no node offers nvidia.com/gpu"
    free = ", ".join(f"{row.free}/{row.allocatable} {row.gpu_type} ({row.capacity})" for row in rows)
    return f"{where}: free {free}"


# --- this machine --------------------------------------------------------------------------


def local_gpus() -> tuple[list[LocalGpu], list[str]]:
    """CUDA devices through torch; their utilisation through NVML when nvidia-ml-py is installed."""
    import torch

    if not torch.cuda.is_available():
        return [], []
    nvml, notes = _nvml()
    devices = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        busy = _nvml_utilization(nvml, properties, index) if nvml else None
        devices.append(LocalGpu(
            index=index, name=properties.name, memory_total_gib=total / GIB, memory_free_gib=free / GIB,
            utilization=busy[0] if busy else None, memory_utilization=busy[1] if busy else None,
        ))
    return devices, notes


def _nvml():
    try:
        import pynvml  # the nvidia-ml-py package
    except ImportError:
        return None, ["GPU utilisation not read: nvidia-ml-py is not installed"]
    try:
        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001 - no driver library, or not permitted: utilisation is unknown
        return None, [f"GPU utilisation not read: NVML did not start ({_first_line(error)})"]
    return pynvml, []


def _nvml_utilization(nvml, properties, index: int) -> tuple[float, float] | None:
    """By the device's UUID when torch knows it: with CUDA_VISIBLE_DEVICES, torch's cuda:0 need not be NVML's 0."""
    try:
        uuid = getattr(properties, "uuid", None)
        handle = nvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}") if uuid else nvml.nvmlDeviceGetHandleByIndex(index)
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)
        return rates.gpu / 100.0, rates.memory / 100.0
    except Exception:  # noqa: BLE001 - a device NVML cannot query (MIG slice, permissions): utilisation unknown
        return None


def _psutil():
    import psutil

    return psutil


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return None


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _local_summary(devices: list[LocalGpu], memory) -> str:
    cores = _psutil().cpu_count(logical=True)
    ram = f"{memory.available / GIB:.1f} of {memory.total / GIB:.1f} GiB memory free"
    if not devices:
        return f"this machine: no CUDA device; {cores} CPU cores, {ram}"
    gpus = ", ".join(f"cuda:{d.index} {d.name} ({d.memory_free_gib:.1f} of {d.memory_total_gib:.1f} GiB free)"
                     for d in devices)
    return f"this machine: {gpus}; {cores} CPU cores, {ram}"


# --- what Prefect lets run at once ---------------------------------------------------------


@dataclass(frozen=True)
class RunLimits:
    pools: list[PoolSlots]
    gpu_slots: GpuSlots | None
    notes: list[str]


def run_limits(pool_type: Literal["process", "kubernetes"]) -> RunLimits:
    """The limits of the pools of this type (from the pools file) on the Prefect server, and the gpu-slots limit.

    A server that is not set or does not answer leaves them out with a note; it never fails the call.
    """
    names = [pool.name for pool in load_pools().pools if pool.type == pool_type]
    try:
        with context.prefect() as client:
            pools = [slots for name in names if (slots := _slots_of(client, name)) is not None]
            gpu_slots = _gpu_slots(client)
    except (Unavailable, httpx.HTTPStatusError) as error:
        return RunLimits([], None, [f"run limits not read: {_first_line(error)}"])
    missing = [f"work pool {name} is not on the Prefect server (`python -m work_pools.apply` creates it)"
               for name in names if name not in {pool.pool for pool in pools}]
    return RunLimits(pools, gpu_slots, missing)


def _slots_of(client, name: str) -> PoolSlots | None:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType, WorkerStatus
    from prefect.exceptions import ObjectNotFound

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        return None
    queues = client.read_work_queues(work_pool_name=name)
    busy = client.count_flow_runs(
        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[name])),
        flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
            any_=[StateType.PENDING, StateType.RUNNING, StateType.CANCELLING]))),
    )
    online = [worker for worker in client.read_workers_for_work_pool(name) if worker.status == WorkerStatus.ONLINE]
    limit = pool.concurrency_limit
    return PoolSlots(
        pool=name, pool_limit=limit, queue_limits={queue.name: queue.concurrency_limit for queue in queues},
        running=busy, workers_online=len(online), can_start=max(0, limit - busy) if limit is not None else None,
    )


def _gpu_slots(client) -> GpuSlots | None:
    from prefect.exceptions import ObjectNotFound

    try:
        found = client.read_global_concurrency_limit_by_name(GPU_SLOTS_LIMIT)
    except ObjectNotFound:
        return None
    return GpuSlots(limit=found.limit, active=found.active_slots)


# --- helpers -------------------------------------------------------------------------------


def run_async(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine from synchronous code, also where this thread already runs an event loop (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


# --- a request against its pool --------------------------------------------------------------


class ClusterCheck(BaseModel):
    """What the cluster says of a Kubernetes pool request (work_pools.gpu_capacity.judge)."""

    model_config = ConfigDict(frozen=True)

    starts_now: bool = Field(description="A node of its GPU type has enough free GPUs, within its namespace's quota.")
    reason: str = Field(description="Why it starts now, or what it waits for.")
    free_on_one_node: int | None = Field(description="The most free GPUs of its type on one node.")
    quota_left: int | None = Field(description="GPUs its namespace's quota has left; None: no GPU quota.")


@dataclass(frozen=True)
class PoolFindings:
    """A request against its pool: what can never run (problems), what to know (notes), the cluster's word."""

    pool_type: str | None
    problems: list[str]
    notes: list[str]
    cluster: ClusterCheck | None
    runs_here: bool  # False: the pool cannot give what the request bills for (nothing to quote)


def check_pool_request(pool_name: str | None, queue: str | None, variables: dict[str, Any],
                       parameters: dict[str, Any]) -> PoolFindings:
    """The checks `oppen.submit.submit` makes before it creates a run, as findings instead of exceptions.

    Every pool: its queue and job variables against the pools file. The local process pool: the
    request's GPUs against this machine. A Kubernetes pool: the GPUs it is priced for against the
    ones its pod asks for, and, with a kube context, the cluster's nodes and quotas.
    """
    from oppen.submit import check_priced_as_scheduled
    from work_pools.gpu_capacity import GpuRequestRefused
    from work_pools.job_variables import check_request

    if pool_name is None:
        return PoolFindings(None, ["its deployment has no work pool: no worker would ever run it"], [], None, False)
    try:
        pool, template = check_request(load_pools(), pool_name, queue, variables)
    except ValueError as error:  # an unknown pool or queue, a job variable the template rejects
        return PoolFindings(None, [str(error)], [], None, True)
    if pool.type == "process":
        problem = _local_resources_problem(parameters)
        return PoolFindings(pool.type, [problem] if problem else [], [], None, problem is None)
    try:
        check_priced_as_scheduled(parameters, variables, template)
    except ValueError as error:
        return PoolFindings(pool.type, [str(error)], [], None, True)
    config_file = kube_config_file()
    if config_file is None:
        return PoolFindings(pool.type, [], ["no kube context here: GPU capacity and quotas were not checked against "
                                            "a cluster"], None, True)
    try:
        verdict = cluster_verdict(config_file, variables, template)
    except GpuRequestRefused as refused:
        return PoolFindings(pool.type, [str(refused)], [], None, True)
    except Unavailable as error:
        return PoolFindings(pool.type, [], [f"GPU capacity not checked: {error}"], None, True)
    cluster = ClusterCheck(
        starts_now=verdict.starts_now, reason=verdict.reason,
        free_on_one_node=verdict.availability.largest_free if verdict.availability else None,
        quota_left=verdict.quota.left if verdict.quota else None,
    )
    return PoolFindings(pool.type, [], [] if verdict.starts_now else [verdict.reason], cluster, True)


def _local_resources_problem(parameters: dict[str, Any]) -> str | None:
    """The process pool runs on this machine: a request for GPUs it lacks would be billed for nothing.

    A request that does not validate is left to the caller's resolve, which says what is wrong with it.
    """
    from pydantic import ValidationError

    from oppen.cost.policy import CostPolicy
    from tasks.cost_tasks import ResourceRequestError, check_local_resources
    from training.config import RunConfig

    try:
        cost = CostPolicy.model_validate(parameters.get("cost") or {})
        run = RunConfig.model_validate(parameters.get("run") or {})  # only its device matters here
    except ValidationError:
        return None
    try:
        check_local_resources(cost.resources, run)
    except ResourceRequestError as error:
        return str(error)
    return None
