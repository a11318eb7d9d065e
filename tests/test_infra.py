"""infra/: every kustomization builds with `kubectl kustomize`, every object validates against the
Kubernetes schema, and the pieces agree with each other (priority classes, quotas, names)."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from work_pools.kubernetes_template import PRIORITY_CLASSES
from work_pools.render import KUBERNETES_VERSION, PROJECT_DIR, validate_manifest
from work_pools.spec import load_pools

INFRA = PROJECT_DIR / "infra"
KUSTOMIZATIONS = ["base", "overlays/team-vision", "overlays/team-nlp"]
KUBECTL = shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run installs it)")


def build(path: str) -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(INFRA / path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None, namespace: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomization_builds_and_every_object_validates(path):
    objects = build(path)
    assert len(objects) > 20
    for obj in objects:
        try:
            validate_manifest(obj)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path}: {obj['kind']}/{obj['metadata']['name']}: {error}")


def test_validation_is_strict_enough_to_catch_misplaced_fields():
    # prefect-kubernetes' default template puts Job fields in the pod spec; the schema says no.
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}], "restartPolicy": "Never"}}}}
    validate_manifest(job)
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["completions"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)


@needs_kubectl
def test_base_has_the_platform():
    objects = build("base")
    assert find(objects, "Namespace", "ml-training")
    classes = {o["metadata"]["name"]: o for o in find(objects, "PriorityClass")}
    assert set(classes) == set(PRIORITY_CLASSES)
    assert classes["oppen-urgent"]["value"] > classes["oppen-normal"]["value"] > classes["oppen-background"]["value"]
    assert classes["oppen-background"]["preemptionPolicy"] == "Never"
    assert classes["oppen-urgent"]["preemptionPolicy"] == "PreemptLowerPriority"
    # MLflow keeps artifacts on a PVC, its metadata in PostgreSQL.
    mlflow = find(objects, "Deployment", "mlflow")[0]["spec"]["template"]["spec"]
    assert [v for v in mlflow["volumes"] if "persistentVolumeClaim" in v]
    assert not [v for v in mlflow["volumes"] if "emptyDir" in v]
    assert "postgresql://" in " ".join(mlflow["containers"][0]["args"])
    assert find(objects, "StatefulSet", "postgres")
    assert find(objects, "DaemonSet", "nvidia-device-plugin-daemonset")
    assert find(objects, "PersistentVolumeClaim", "oppen-checkpoints", "ml-training")
    assert find(objects, "ConfigMap", "oppen-runtime", "ml-training")
    assert find(objects, "NetworkPolicy", "default-deny-ingress", "ml-training")
    # Denied everything else, a training pod is still scraped: Prometheus may reach its named metrics port only.
    [scrape] = find(objects, "NetworkPolicy", "scrape-training-runs", "ml-training")
    assert [port["port"] for rule in scrape["spec"]["ingress"] for port in rule["ports"]] == ["oppen-metrics"]
    # The Prefect API is reachable from Oppen's namespaces (worker, flow runs, exporter, alert receiver).
    [prefect] = find(objects, "NetworkPolicy", "prefect-server-from-oppen", "ml-training")
    assert [port["port"] for rule in prefect["spec"]["ingress"] for port in rule["ports"]] == [4200]


@needs_kubectl
def test_worker_rbac_is_least_privilege():
    objects = build("base")
    role = find(objects, "Role", "prefect-worker", "ml-training")[0]
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    resources = {resource for _, resource, _ in granted}
    assert resources == {"jobs", "pods", "pods/log", "events"}
    assert not {verb for _, _, verb in granted} & {"*", "update", "patch", "escalate", "bind", "impersonate"}
    assert ("batch", "jobs", "create") in granted
    cluster_role = find(objects, "ClusterRole", "oppen-gpu-availability")[0]
    assert {verb for rule in cluster_role["rules"] for verb in rule["verbs"]} == {"get", "list"}


@needs_kubectl
def test_pods_run_as_non_root_everywhere_oppen_owns_them():
    for obj in build("base"):
        if obj["kind"] in ("Deployment", "StatefulSet") and obj["metadata"].get("namespace") == "ml-training":
            spec = obj["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, obj["metadata"]["name"]
            for c in spec["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False


@needs_kubectl
@pytest.mark.parametrize("team, gpus", [("vision", "8"), ("nlp", "4")])
def test_team_overlays_have_their_own_namespace_quota_and_worker_access(team, gpus):
    objects = build(f"overlays/team-{team}")
    namespace = f"ml-team-{team}"
    assert find(objects, "Namespace", namespace)
    quota = find(objects, "ResourceQuota", "oppen-compute", namespace)[0]["spec"]["hard"]
    assert quota["requests.nvidia.com/gpu"] == gpus
    assert find(objects, "ResourceQuota", "oppen-compute", "ml-training")[0]["spec"]["hard"]["requests.nvidia.com/gpu"] == "4"
    assert find(objects, "LimitRange", "oppen-defaults", namespace)
    binding = find(objects, "RoleBinding", "prefect-worker", namespace)[0]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prefect-worker", "namespace": "ml-training"}]
    assert find(objects, "PersistentVolumeClaim", "oppen-checkpoints", namespace)
    assert find(objects, "ServiceAccount", "oppen-run", namespace)


def test_helm_values_point_the_worker_at_the_gpu_pool():
    worker = yaml.safe_load((INFRA / "helm" / "prefect-worker-values.yaml").read_text())
    pool_names = {pool.name for pool in load_pools().pools}
    assert worker["worker"]["config"]["workPool"] in pool_names
    assert worker["worker"]["config"]["type"] == "kubernetes"
    assert worker["serviceAccount"] == {"create": False, "name": "prefect-worker"}
    server = yaml.safe_load((INFRA / "helm" / "prefect-server-values.yaml").read_text())
    assert server["postgresql"]["enabled"] is False


def test_dockerfile_copies_every_package_the_project_installs():
    dockerfile = (INFRA / "Dockerfile").read_text()
    pyproject = (PROJECT_DIR / "pyproject.toml").read_text()
    for package in ("oppen", "training", "tasks", "flows", "work_pools"):
        assert f"{package}*" in pyproject
        assert f"COPY --chown=10001:10001 {package} {package}" in dockerfile
        assert Path(PROJECT_DIR / package).is_dir()
    assert "USER 10001" in dockerfile and "FROM python:${PYTHON_VERSION}-slim" in dockerfile


def test_image_build_step_prints_the_image_without_an_engine_when_told_to(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "OPPEN_SKIP_IMAGE_BUILD": "1", "OPPEN_IMAGE": "registry.example.com/oppen-train:v1"}
    result = subprocess.run([str(INFRA / "build-image.sh")], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "registry.example.com/oppen-train:v1"
    no_engine = {"PATH": "/usr/bin:/bin", "OPPEN_CONTAINER_ENGINE": ""}
    if not (shutil.which("docker", path=no_engine["PATH"]) or shutil.which("podman", path=no_engine["PATH"])):
        refused = subprocess.run([str(INFRA / "build-image.sh")], capture_output=True, text=True, env=no_engine,
                                 timeout=60)
        assert refused.returncode == 1 and "no docker or podman found" in refused.stderr
