"""The Kubernetes GPU pool, offline: template derivation, Job rendering with prefect-kubernetes'
own code, Kubernetes schema validation, and job-variable checks before a flow run exists."""

from __future__ import annotations

import asyncio
import json

import pytest
from prefect.client.orchestration import PrefectClient

from work_pools.job_variables import JobVariablesError, check_request
from work_pools.kubernetes_template import (
    MAX_TOLERATIONS,
    PLATFORM_TOLERATIONS,
    TEMPLATE_FILE,
    derive,
    prefect_kubernetes_default,
    render_json,
)
from work_pools.render import (
    deployment_job_variables,
    deployment_label,
    prefect_yaml_deployments,
    render_job_manifest,
    validate_manifest,
)
from work_pools.spec import load_pools

QUEUES = ("urgent", "normal", "background")
POOLS = load_pools()
GPU_POOL = next(p for p in POOLS.pools if p.name == "kubernetes-gpu")
TEMPLATE = GPU_POOL.template()


def render(variables: dict) -> dict:
    # A client is required by the signature; these templates reference no blocks or Prefect
    # variables, so it makes no request (were one made, the closed port would fail the test).
    async def go():
        async with PrefectClient(api="http://127.0.0.1:9/api") as client:
            return await render_job_manifest(TEMPLATE, variables, client)

    return asyncio.run(go())


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def container(manifest: dict) -> dict:
    return pod_spec(manifest)["containers"][0]


def env_of(manifest: dict) -> dict:
    return {item["name"]: item.get("value") for item in container(manifest)["env"]}


def test_committed_template_is_derived_from_installed_prefect_kubernetes_default():
    default = prefect_kubernetes_default()
    assert TEMPLATE_FILE.read_text() == render_json(derive(default)), (
        "work_pools/kubernetes-gpu.json is stale: run `python -m work_pools.kubernetes_template`"
    )
    # Every variable of the default is kept.
    assert set(default["variables"]["properties"]) <= set(TEMPLATE["variables"]["properties"])


GPU_DEPLOYMENTS = [d for d in prefect_yaml_deployments() if d["work_pool"]["name"] == "kubernetes-gpu"]


def test_prefect_yaml_has_gpu_deployments_for_each_workload():
    labels = {deployment_label(d) for d in GPU_DEPLOYMENTS}
    assert {"train-mnist/gpu", "train-lm/gpu", "train-mnist/gpu-urgent", "train-lm/gpu-spot"} <= labels


@pytest.mark.parametrize("queue", QUEUES)
@pytest.mark.parametrize("deployment", GPU_DEPLOYMENTS, ids=deployment_label)
def test_every_gpu_deployment_renders_a_valid_job_on_every_queue(deployment, queue):
    variables = deployment_job_variables(deployment) | {"priority_class_name": f"oppen-{queue}"}
    check_request(POOLS, "kubernetes-gpu", queue, variables)
    manifest = render(variables)
    validate_manifest(manifest)

    spec, pod, main = manifest["spec"], pod_spec(manifest), container(manifest)
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 86400
    assert "completions" not in pod and spec["completions"] == 1
    assert main["resources"]["limits"]["nvidia.com/gpu"] == variables["gpu_count"]
    assert pod["priorityClassName"] == f"oppen-{queue}"
    assert main["image"] == variables["image"]
    assert pod["serviceAccountName"] == "oppen-run"
    assert manifest["metadata"]["namespace"] == "ml-training"
    # Interrupted runs are rescheduled by Prefect, and find their checkpoints on the PVC.
    env = env_of(manifest)
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "reschedule"
    assert env["OPPEN_CHECKPOINT_ROOT"] == "/checkpoints"
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts == {"dshm": "/dev/shm", "checkpoints": "/checkpoints"}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert volumes["checkpoints"]["persistentVolumeClaim"]["claimName"] == "oppen-checkpoints"
    assert {"configMapRef": {"name": "oppen-runtime"}} in main["envFrom"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # GPU type and capacity class are hard scheduling requirements.
    expressions = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"]
    by_key = {e["key"]: e for e in expressions}
    assert by_key["nvidia.com/gpu.product"]["values"] == [variables["gpu_type"]]
    spot = variables.get("spot", False)
    assert by_key["oppen.io/spot"]["values"] == [f"spot-{spot}"]
    assert pod["tolerations"] == PLATFORM_TOLERATIONS


def test_spot_requires_spot_nodes_and_on_demand_requires_on_demand_nodes():
    on_demand = render({"image": "x"})
    spot = render({"image": "x", "spot": True})
    for manifest, value in ((on_demand, "spot-False"), (spot, "spot-True")):
        pod = pod_spec(manifest)
        expressions = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"][0]["matchExpressions"]
        assert {"key": "oppen.io/spot", "operator": "In", "values": [value]} in expressions
        assert {"key": "oppen.io/spot", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert manifest["spec"]["template"]["metadata"]["labels"]["oppen.io/spot"] == value


def test_user_tolerations_node_selector_and_sizes_render():
    mine = [{"key": "team", "operator": "Equal", "value": "vision", "effect": "NoSchedule"},
            {"key": "maintenance", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 600}]
    manifest = render({"image": "x", "tolerations": PLATFORM_TOLERATIONS + mine, "node_selector": {"pool": "a100"}, "gpu_count": 4,
                       "gpu_type": "NVIDIA-A100-SXM4-80GB", "shm_size": "16Gi", "checkpoint_claim": "team-ckpt",
                       "checkpoint_mount_path": "/ckpt", "active_deadline_seconds": 3600, "namespace": "ml-team-vision",
                       "env": {"EXTRA": "1"}, "cpu_request": "8", "memory_request": "64Gi"})
    validate_manifest(manifest)
    pod, main = pod_spec(manifest), container(manifest)
    assert pod["tolerations"] == PLATFORM_TOLERATIONS + mine
    assert pod["nodeSelector"] == {"pool": "a100"}
    assert main["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert main["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}
    assert {v["name"]: v for v in pod["volumes"]}["dshm"]["emptyDir"]["sizeLimit"] == "16Gi"
    assert {m["name"]: m["mountPath"] for m in main["volumeMounts"]}["checkpoints"] == "/ckpt"
    env = env_of(manifest)
    assert env["OPPEN_CHECKPOINT_ROOT"] == "/ckpt" and env["EXTRA"] == "1"
    assert manifest["spec"]["activeDeadlineSeconds"] == 3600
    assert manifest["metadata"]["namespace"] == "ml-team-vision"


@pytest.mark.parametrize(
    "queue, variables, message",
    [
        ("normal", {"gpu_count": -1}, "gpu_count: -1 is less than the minimum of 1"),
        ("normal", {"gpu_count": 17}, "gpu_count: 17 is greater than the maximum of 16"),
        ("normal", {"gpu_count": "two"}, "gpu_count: 'two' is not of type 'integer'"),
        ("normal", {"priority_class_name": "vip"}, "priority_class_name: 'vip' is not one of"),
        ("normal", {"tolerations": [{"key": "a", "operator": "Sometimes"}]}, "tolerations.0.operator: 'Sometimes'"),
        ("normal", {"tolerations": [{"key": "a", "effects": "NoSchedule"}]}, "tolerations.0: Additional properties"),
        ("normal", {"tolerations": "gpu"}, "tolerations: 'gpu' is not of type 'array'"),
        ("normal", {"tolerations": [{"key": str(i), "operator": "Exists"} for i in range(MAX_TOLERATIONS + 1)]},
         "is too long"),
        ("normal", {"tolerations": [{"key": "team", "operator": "Exists"}]},
         "keep the platform tolerations [{'key': 'nvidia.com/gpu'"),
        ("normal", {"gpu_type": "A100 80GB"}, "gpu_type: 'A100 80GB' does not match"),
        ("normal", {"spot": "yes"}, "spot: 'yes' is not of type 'boolean'"),
        ("normal", {"shm_size": "lots"}, "shm_size: 'lots' does not match"),
        ("normal", {"backoff_limit": 3}, "backoff_limit: 3 is greater than the maximum of 0"),
        ("normal", {"gpus": 2}, "Additional properties are not allowed ('gpus' was unexpected)"),
        ("urgnet", {}, "unknown queue 'urgnet' in pool 'kubernetes-gpu'; use one of ['urgent', 'normal', 'background']"),
        ("urgent", {"priority_class_name": "oppen-background"}, "does not match queue 'urgent'"),
    ],
)
def test_bad_job_variables_are_refused_with_a_clear_message(queue, variables, message):
    with pytest.raises(JobVariablesError) as refused:
        check_request(POOLS, "kubernetes-gpu", queue, variables)
    assert message in str(refused.value)


CPU_VARIABLES = ("cpu_request", "cpu_limit")
MEMORY_VARIABLES = ("memory_request", "memory_limit")


@pytest.mark.parametrize("value", ["500m", "2", "0.5", "1.5", "16", "250m", "0.1", None])
@pytest.mark.parametrize("variable", CPU_VARIABLES)
def test_kubernetes_cpu_quantities_pass(variable, value):
    check_request(POOLS, "kubernetes-gpu", "normal", {variable: value})


@pytest.mark.parametrize("value", ["128Mi", "16Gi", "1G", "512M", "1e9", "2048", "1.5Gi", "64k", "1Ti", "5E6", None])
@pytest.mark.parametrize("variable", MEMORY_VARIABLES)
def test_kubernetes_memory_quantities_pass(variable, value):
    check_request(POOLS, "kubernetes-gpu", "normal", {variable: value})


@pytest.mark.parametrize(
    "variables, message",
    [
        *(({name: value}, f"job variable {name}: {value!r} is not a Kubernetes CPU quantity")
          for name in CPU_VARIABLES
          for value in ("2 cores", "-1", "1.5.2", "", " 2", "2Gi", "1k", "500M", "2.5 ")),
        *(({name: value}, f"job variable {name}: {value!r} is not a Kubernetes memory quantity")
          for name in MEMORY_VARIABLES
          # "500m" parses as half a byte; "1K" and "10mi" are not suffixes at all.
          for value in ("16GB", "-1", "1.5.2", "Gi", "10mi", "500m", "1K", "2 Gi", "1e", "0x10", "")),
        ({"cpu_request": 2}, "job variable cpu_request: 2 is not valid under any of the given schemas"),
    ],
)
def test_bad_resource_quantities_are_refused_naming_the_variable(variables, message):
    with pytest.raises(JobVariablesError) as refused:
        check_request(POOLS, "kubernetes-gpu", "normal", variables)
    assert message in str(refused.value)


def test_a_job_with_cpu_and_memory_quantities_renders_and_validates():
    variables = {"image": "x", "cpu_request": "500m", "memory_request": "2Gi", "cpu_limit": "1.5", "memory_limit": "4G"}
    check_request(POOLS, "kubernetes-gpu", "normal", variables)
    manifest = render(variables)
    validate_manifest(manifest)
    resources = container(manifest)["resources"]
    assert resources["requests"] == {"cpu": "500m", "memory": "2Gi"}
    assert (resources["limits"]["cpu"], resources["limits"]["memory"]) == ("1.5", "4G")


def test_all_problems_are_reported_at_once_and_unknown_names_list_the_known_ones():
    with pytest.raises(JobVariablesError) as refused:
        check_request(POOLS, "kubernetes-gpu", "normal", {"gpu_count": 0, "spot": 1, "gpus": 2})
    lines = str(refused.value).splitlines()
    assert any(line.startswith("job variable gpu_count:") for line in lines)
    assert any(line.startswith("job variable spot:") for line in lines)
    assert any("variables of pool 'kubernetes-gpu':" in line and "gpu_type" in line for line in lines)


def test_unknown_pool_is_refused():
    with pytest.raises(JobVariablesError, match="unknown work pool 'gpu'"):
        check_request(POOLS, "gpu", "normal", {})


def test_local_deployments_pass_the_same_checks():
    for deployment in prefect_yaml_deployments():
        pool = deployment["work_pool"]
        check_request(POOLS, pool["name"], pool.get("work_queue_name"), deployment_job_variables(deployment))


def test_gpu_slots_limit_is_declared():
    limit = POOLS.limit_named("gpu-slots")
    assert limit is not None and limit.limit >= 1
    assert GPU_POOL.concurrency_limit and [q.priority for q in GPU_POOL.queues] == [1, 2, 3]
    assert json.loads(TEMPLATE_FILE.read_text())["variables"]["properties"]["gpu_count"]["maximum"] == 16


def test_every_deployment_in_prefect_yaml_passes_oppen_check():
    from oppen.submit import check_prefect_yaml

    lines = check_prefect_yaml()
    assert len(lines) == len(prefect_yaml_deployments()) and all(line.endswith(": ok") for line in lines)


@pytest.mark.parametrize(
    "parameters, variables, ok",
    [
        ({"cost": {"resources": {"gpus": 1, "gpu_type": "NVIDIA-L4"}}}, {}, True),
        ({"cost": {"resources": {"gpus": 2, "gpu_type": "NVIDIA-L4"}}}, {"gpu_count": 2}, True),
        ({"cost": {"resources": {"gpus": 1, "gpu_type": "NVIDIA-L4"}, "spot": True}}, {"spot": True}, True),
        ({}, {}, False),  # priced as a CPU run, scheduled with a GPU
        ({"cost": {"resources": {"gpus": 1, "gpu_type": "NVIDIA-L4"}}}, {"gpu_count": 4}, False),
        ({"cost": {"resources": {"gpus": 1, "gpu_type": "NVIDIA-L4"}}}, {"spot": True}, False),
        ({"cost": {"resources": {"gpus": 1, "gpu_type": "NVIDIA-H100"}}}, {}, False),
    ],
)
def test_a_gpu_run_must_be_priced_as_what_its_pod_holds(parameters, variables, ok):
    from oppen.submit import check_priced_as_scheduled

    if ok:
        check_priced_as_scheduled(parameters, variables, TEMPLATE)
    else:
        with pytest.raises(ValueError, match="make them agree"):
            check_priced_as_scheduled(parameters, variables, TEMPLATE)


def test_training_pods_serve_run_metrics_on_the_port_the_pod_monitor_scrapes():
    manifest = render({})
    assert container(manifest)["ports"] == [{"name": "oppen-metrics", "containerPort": 8781, "protocol": "TCP"}]
    assert env_of(manifest)["OPPEN_METRICS_PORT"] == "8781" and env_of(manifest)["OPPEN_METRICS_HOST"] == "0.0.0.0"
    validate_manifest(manifest)
