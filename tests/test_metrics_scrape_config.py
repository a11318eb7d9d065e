"""infra/monitoring/scrape: it builds, its Kubernetes objects validate, its operator objects have the
operator's shape, and every piece points at the one it means (ports, labels, job names, the exporter's
own command line). The plain local config passes `promtool check config`.

kubernetes-validate knows no CRDs, so PodMonitor and ServiceMonitor are checked against strict models
of the monitoring.coreos.com/v1 fields they use (field names and types as the prometheus-operator API
reference gives them; an unknown or misspelt field fails, as the API server's structural schema would
prune or refuse it), and then for what they select.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from typing import Literal

import kubernetes_validate
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from oppen.metrics.platform_exporter import PlatformExporterOptions, build_parser
from work_pools.render import PROJECT_DIR, validate_manifest

SCRAPE = PROJECT_DIR / "infra" / "monitoring" / "scrape"
KUBECTL, PROMTOOL = shutil.which("kubectl"), shutil.which("promtool")
JOBS = {"oppen-runs", "oppen-exporter", "prefect-server"}  # the names rules and dashboards read
RUN_PORT_NAME = "oppen-metrics"  # the flow-run container's named port (the GPU job template declares it)
PREFECT_SERVER_SERVICE_LABELS = {"app.kubernetes.io/name": "prefect-server", "app.kubernetes.io/component": "server"}

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run installs it)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LabelSelector(_Strict):
    matchLabels: dict[str, str] = {}
    matchExpressions: list[dict] = []


class NamespaceSelector(_Strict):
    any: bool = False
    matchNames: list[str] = []


class RelabelConfig(_Strict):
    sourceLabels: list[str] = []
    separator: str | None = None
    targetLabel: str | None = None
    regex: str | None = None
    modulus: int | None = None
    replacement: str | None = None
    action: Literal["replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep", "lowercase",
                    "uppercase", "keepequal", "dropequal"] = "replace"


class Endpoint(_Strict):
    port: str = Field(min_length=1)
    path: str = "/metrics"
    interval: str | None = Field(None, pattern=r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                                r"(([0-9]+)s)?(([0-9]+)ms)?)$")
    scheme: Literal["http", "https"] | None = None
    honorLabels: bool = False
    relabelings: list[RelabelConfig] = []
    metricRelabelings: list[RelabelConfig] = []


class MonitorSpec(_Strict):
    selector: LabelSelector
    namespaceSelector: NamespaceSelector = NamespaceSelector()
    jobLabel: str | None = None
    podMetricsEndpoints: list[Endpoint] | None = None  # PodMonitor
    endpoints: list[Endpoint] | None = None  # ServiceMonitor


class Metadata(_Strict):
    name: str
    namespace: str
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}


class Monitor(_Strict):
    apiVersion: Literal["monitoring.coreos.com/v1"]
    kind: Literal["PodMonitor", "ServiceMonitor"]
    metadata: Metadata
    spec: MonitorSpec


def build() -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(SCRAPE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def selects(selector: dict, labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def job_of(endpoint: dict) -> str:
    (rename,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    return rename["replacement"]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed (.ci/run installs it)")
    return build()


def test_native_objects_validate_and_monitors_have_the_operators_shape(objects):
    monitors = [o for o in objects if o["apiVersion"] == "monitoring.coreos.com/v1"]
    assert {o["kind"] for o in monitors} == {"PodMonitor", "ServiceMonitor"} and len(monitors) == 3
    for obj in objects:
        if obj in monitors:
            spec = Monitor.model_validate(obj).spec
            endpoints = spec.podMetricsEndpoints if obj["kind"] == "PodMonitor" else spec.endpoints
            assert endpoints, obj["metadata"]["name"]
            assert (spec.podMetricsEndpoints is None) == (obj["kind"] == "ServiceMonitor")
            continue
        try:
            validate_manifest(obj)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error}")
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "oppen" for o in objects)


def test_the_shape_check_catches_a_misspelt_field():
    bad = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": {"name": "x", "namespace": "y"},
           "spec": {"selector": {}, "podMetricEndpoints": [{"port": "oppen-metrics"}]}}
    with pytest.raises(ValueError):
        Monitor.model_validate(bad)


def test_runs_are_scraped_on_the_flow_run_pods_named_port_in_every_namespace(objects):
    monitor = one(objects, "PodMonitor", "oppen-runs")["spec"]
    assert monitor["namespaceSelector"] == {"any": True}  # team namespaces too
    # prefect-kubernetes labels every flow-run pod so; the port name narrows it to pods that serve run metrics.
    assert selects(monitor["selector"], {"app.kubernetes.io/managed-by": "prefect"})
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == RUN_PORT_NAME and job_of(endpoint) == "oppen-runs"
    policy = one(objects, "NetworkPolicy", "scrape-training-runs")["spec"]
    assert policy["podSelector"] == monitor["selector"]
    assert [port["port"] for rule in policy["ingress"] for port in rule["ports"]] == [RUN_PORT_NAME]


def test_the_platform_exporter_is_deployed_served_and_scraped_as_its_command_line_says(objects):
    deployment = one(objects, "Deployment", "oppen-exporter")
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[:4] == ["python", "-m", "oppen.metrics.platform_exporter", "serve"]
    parsed = build_parser().parse_args(args[3:])  # the exporter's own parser accepts them
    options = PlatformExporterOptions(host=parsed.host, port=parsed.port, interval_s=parsed.interval)
    assert options.host == "0.0.0.0"  # reachable on the pod's address
    (port,) = container["ports"]
    assert port["containerPort"] == options.port and port["name"] == "metrics"
    assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert {e["name"]: e["value"] for e in container["env"]}["PREFECT_API_URL"].endswith(":4200/api")
    assert {"secretRef": {"name": "oppen-runtime"}} in container["envFrom"]  # the ledger's URL
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert deployment["spec"]["replicas"] == 1  # two would serve every platform series twice

    service = one(objects, "Service", "oppen-exporter")
    assert selects({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "metrics"
    monitor = one(objects, "ServiceMonitor", "oppen-exporter")["spec"]
    assert selects(monitor["selector"], service["metadata"]["labels"])
    assert monitor["namespaceSelector"]["matchNames"] == [service["metadata"]["namespace"]]
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == service_port["name"] and job_of(endpoint) == "oppen-exporter"
    # Scraping faster than it polls would only repeat a poll.
    assert int(endpoint["interval"].removesuffix("s")) >= options.interval_s
    policy = one(objects, "NetworkPolicy", "scrape-oppen-exporter")["spec"]
    assert selects(policy["podSelector"], pod["metadata"]["labels"])


def test_prefects_own_metrics_are_scraped_from_the_charts_service(objects):
    monitor = one(objects, "ServiceMonitor", "prefect-server")["spec"]
    # The prefect-server chart labels its Service so and names its port server-svc-port.
    assert monitor["selector"]["matchLabels"] == PREFECT_SERVER_SERVICE_LABELS
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == "server-svc-port" and endpoint["path"] == "/api/metrics"
    assert job_of(endpoint) == "prefect-server"
    policy = one(objects, "NetworkPolicy", "scrape-prefect-server")["spec"]
    assert policy["podSelector"]["matchLabels"] == PREFECT_SERVER_SERVICE_LABELS


def test_scrapers_come_from_the_monitoring_namespace_only(objects):
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


def test_the_local_config_has_the_same_jobs_and_finds_runs_where_they_write_their_targets():
    config = yaml.safe_load((SCRAPE / "prometheus-local.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == JOBS
    (discovery,) = jobs["oppen-runs"]["file_sd_configs"]
    # Relative to the config's folder: the repository's .oppen, the default OPPEN_HOME.
    (pattern,) = discovery["files"]
    assert (SCRAPE / pattern).resolve() == (PROJECT_DIR / ".oppen" / "metrics-targets" / "*.json").resolve()
    assert jobs["prefect-server"]["metrics_path"] == "/api/metrics"
    exporter_port = PlatformExporterOptions().port
    assert jobs["oppen-exporter"]["static_configs"] == [{"targets": [f"127.0.0.1:{exporter_port}"]}]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (.ci/run installs the prometheus package)")
def test_promtool_accepts_the_local_config():
    result = subprocess.run([PROMTOOL, "check", "config", str(SCRAPE / "prometheus-local.yml")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_kustomization_lists_every_manifest_here():
    listed = set(yaml.safe_load((SCRAPE / "kustomization.yaml").read_text())["resources"])
    manifests = {path.name for path in SCRAPE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == manifests, shlex.join(sorted(listed ^ manifests))
