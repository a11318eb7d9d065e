"""GPU availability and request checks on realistic node, pod and quota objects built with the
kubernetes client's own models (what `CoreV1Api.list_node()` etc. return)."""

from __future__ import annotations

import pytest
from kubernetes_asyncio.client import (
    V1Container,
    V1Node,
    V1NodeCondition,
    V1NodeSpec,
    V1NodeStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodSpec,
    V1PodStatus,
    V1ResourceQuota,
    V1ResourceQuotaStatus,
    V1ResourceRequirements,
)

from work_pools.gpu_capacity import GpuRequestRefused, availability, judge, node_gpus, pod_gpus, quota_use

A100 = "NVIDIA-A100-SXM4-80GB"
L4 = "NVIDIA-L4"


def node(name, gpus, product, spot=False, ready=True, cordoned=False):
    return V1Node(
        metadata=V1ObjectMeta(name=name, labels={"nvidia.com/gpu.product": product, "oppen.io/spot": f"spot-{spot}",
                                                 "kubernetes.io/hostname": name}),
        spec=V1NodeSpec(unschedulable=cordoned or None),
        status=V1NodeStatus(
            allocatable={"cpu": "94", "memory": "1000Gi", "nvidia.com/gpu": str(gpus), "pods": "110"},
            capacity={"cpu": "96", "memory": "1008Gi", "nvidia.com/gpu": str(gpus), "pods": "110"},
            conditions=[V1NodeCondition(type="Ready", status="True" if ready else "False")],
        ),
    )


def cpu_node(name):
    return V1Node(metadata=V1ObjectMeta(name=name, labels={}), spec=V1NodeSpec(),
                  status=V1NodeStatus(allocatable={"cpu": "8", "memory": "32Gi"},
                                      conditions=[V1NodeCondition(type="Ready", status="True")]))


def container(gpus=None, limits_only=False):
    resources = {"cpu": "4", "memory": "16Gi"}
    if gpus is not None:
        resources = resources | {"nvidia.com/gpu": str(gpus)}
    return V1Container(name="c", image="i", resources=V1ResourceRequirements(
        limits=resources, requests=None if limits_only else resources))


def pod(name, node_name, containers, phase="Running", init=None, namespace="ml-team-vision"):
    return V1Pod(metadata=V1ObjectMeta(name=name, namespace=namespace),
                 spec=V1PodSpec(node_name=node_name, containers=containers, init_containers=init),
                 status=V1PodStatus(phase=phase))


def quota(namespace, hard, used):
    return V1ResourceQuota(metadata=V1ObjectMeta(name="oppen-compute", namespace=namespace),
                           status=V1ResourceQuotaStatus(hard={"requests.nvidia.com/gpu": str(hard), "requests.cpu": "96"},
                                                        used={"requests.nvidia.com/gpu": str(used), "requests.cpu": "10"}))


NODES = [node("a100-1", 4, A100), node("a100-2", 4, A100), node("l4-1", 8, L4), node("l4-spot-1", 8, L4, spot=True),
         node("a100-down", 4, A100, ready=False), cpu_node("cpu-1")]
PODS = [
    pod("train-a", "a100-1", [container(2), container()]),             # 2 GPUs
    pod("train-b", "a100-1", [container(1, limits_only=True)]),         # limit only: request = limit
    pod("done", "a100-2", [container(4)], phase="Succeeded"),            # finished: holds nothing
    pod("pending", None, [container(4)], phase="Pending"),               # not bound: holds nothing
    pod("init-heavy", "l4-1", [container(1)], init=[container(3)]),     # init container needs 3
    pod("sidecars", "l4-spot-1", [container(2), container(2)]),         # 4
    pod("web", "cpu-1", [container()], namespace="default"),
]
QUOTAS = [quota("ml-team-vision", 8, 6), quota("ml-team-nlp", 4, 0)]


def test_pod_gpus_counts_limits_only_and_init_containers():
    assert pod_gpus(PODS[0]) == 2
    assert pod_gpus(PODS[1]) == 1
    assert pod_gpus(PODS[4]) == 3


def test_availability_per_type_subtracts_running_pods_and_skips_unready_and_cpu_nodes():
    nodes = node_gpus(NODES, PODS)
    assert {n.name for n in nodes} == {"a100-1", "a100-2", "l4-1", "l4-spot-1", "a100-down"}
    on_demand = availability(nodes, spot=False)
    assert on_demand[A100].allocatable == 12 and on_demand[A100].used == 3 and on_demand[A100].free == 5
    assert on_demand[A100].largest_free == 4 and on_demand[A100].largest_node == 4
    assert on_demand[L4].free == 5 and on_demand[L4].largest_free == 5
    spot = availability(nodes, spot=True)
    assert set(spot) == {L4} and spot[L4].free == 4
    everything = availability(nodes)
    assert everything[L4].allocatable == 16 and everything[L4].free == 9


def test_a_request_larger_than_any_node_is_refused_with_the_largest_size():
    with pytest.raises(GpuRequestRefused, match=r"8 x NVIDIA-A100-SXM4-80GB requested, but the largest on-demand .* node has 4"):
        judge(node_gpus(NODES, PODS), QUOTAS, gpu_count=8, gpu_type=A100, spot=False, namespace="ml-team-nlp")


def test_an_unknown_type_is_refused_with_the_types_there_are():
    with pytest.raises(GpuRequestRefused, match=r"no spot node has nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB; "
                                                r"spot GPU types here: NVIDIA-L4 \(8\)"):
        judge(node_gpus(NODES, PODS), QUOTAS, gpu_count=1, gpu_type=A100, spot=True, namespace="ml-team-nlp")


def test_a_request_over_the_team_quota_is_refused():
    with pytest.raises(GpuRequestRefused, match="quota of namespace ml-team-nlp allows 4 at once"):
        judge(node_gpus(NODES, PODS), QUOTAS, gpu_count=5, gpu_type=L4, spot=False, namespace="ml-team-nlp")


def test_a_request_that_fits_starts_now_and_one_that_fits_later_waits():
    nodes = node_gpus(NODES, PODS)
    now = judge(nodes, QUOTAS, gpu_count=4, gpu_type=A100, spot=False, namespace="ml-team-nlp")
    assert now.starts_now and "4 NVIDIA-A100-SXM4-80GB free on one node" in now.reason
    # The vision quota has 2 of 8 left: a 4-GPU run is possible but waits.
    later = judge(nodes, QUOTAS, gpu_count=4, gpu_type=A100, spot=False, namespace="ml-team-vision")
    assert not later.starts_now and "6 of 8 GPUs in use, 2 left" in later.reason
    # 5 free A100s in all, but at most 4 on one node... and every node holds 4: waits for a node to drain.
    busy = node_gpus(NODES, PODS + [pod("x", "a100-2", [container(1)])])
    wait = judge(busy, QUOTAS, gpu_count=4, gpu_type=A100, spot=False, namespace="ml-team-nlp")
    assert not wait.starts_now and "most free on one node: 3" in wait.reason


def test_quota_use_reads_status_hard_and_used():
    use = quota_use(QUOTAS, "ml-team-vision")
    assert (use.hard, use.used, use.left) == (8, 6, 2)
    assert quota_use(QUOTAS, "elsewhere") is None
