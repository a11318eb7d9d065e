"""infra/monitoring/dashboards: four Grafana dashboards as committed JSON, checked without a Grafana.

Each file must be the dashboard model Grafana 10/11 imports (schemaVersion 39): the fields we use, strictly
(a misspelt key is an error here, not a panel Grafana silently drops), unique panel ids, panels on the 24-column
grid without overlaps, every query on the `datasource` variable, every `$variable` defined. Every query parses
with Prometheus' own parser (promtool) and reads only metrics the exporters (oppen/metrics/catalog.py), Prefect's
server or Prometheus serve; the Prefect names are checked against a real server in the slow test. They ship as
ConfigMaps the Grafana sidecar loads (kustomize) and through a provisioning file for a Grafana without it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from typing import Any, Literal

import httpx
import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tests.promtool.promql import (
    KNOWN_METRICS,
    MONITORING,
    PREFECT_SERVER_METRICS,
    check_expressions,
    metric_names,
    needs_promtool,
    prometheus_rules,
    rule_groups,
)

DASHBOARDS = MONITORING / "dashboards"
EXPECTED = {"training-overview.json": "oppen-training-overview", "resource-usage.json": "oppen-resource-usage",
            "cost-and-budget.json": "oppen-cost-budget", "job-queue.json": "oppen-job-queue"}
SCHEMA_VERSION = 39  # Grafana 11.0's; Grafana migrates older models forward, never newer ones back
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables, and a value each takes when a query is checked.
BUILTINS = {"__rate_interval": "1m", "__interval": "30s", "__range": "6h"}
KUBECTL = shutil.which("kubectl")


# --- the dashboard model, as far as these dashboards use it ---------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class GridPos(_Strict):
    h: int = Field(ge=1)
    w: int = Field(ge=1, le=24)
    x: int = Field(ge=0, le=23)
    y: int = Field(ge=0)

    @model_validator(mode="after")
    def _on_the_grid(self) -> GridPos:
        if self.x + self.w > 24:
            raise ValueError(f"x {self.x} + w {self.w} passes Grafana's 24 columns")
        return self


class Datasource(_Strict):
    type: str
    uid: str


class Target(_Strict):
    ref_id: str = Field(alias="refId", pattern=r"^[A-Z]$")
    datasource: Datasource
    expr: str = Field(min_length=1)
    legend_format: str = Field(alias="legendFormat")
    range: bool
    instant: bool
    format: Literal["time_series", "table"] = "time_series"


class Panel(_Strict):
    id: int = Field(ge=1)
    type: Literal["row", "timeseries", "stat", "bargauge", "table"]
    title: str = Field(min_length=1)
    description: str = ""
    grid_pos: GridPos = Field(alias="gridPos")
    datasource: Datasource | None = None
    targets: list[Target] = Field(default_factory=list)
    field_config: dict[str, Any] | None = Field(None, alias="fieldConfig")
    options: dict[str, Any] | None = None
    transformations: list[dict[str, Any]] = Field(default_factory=list)
    collapsed: bool | None = None
    panels: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _complete(self) -> Panel:
        if self.type == "row":
            if self.targets or self.datasource or self.grid_pos.w != 24 or self.grid_pos.h != 1:
                raise ValueError(f"row {self.title!r} must be 24x1 and query nothing")
            return self
        if not (self.description and self.targets and self.field_config and self.options is not None):
            raise ValueError(f"panel {self.title!r} needs a description, targets, fieldConfig and options")
        if len({target.ref_id for target in self.targets}) != len(self.targets):
            raise ValueError(f"panel {self.title!r} repeats a refId")
        return self


class VariableQuery(_Strict):
    query: str
    ref_id: str = Field(alias="refId")


class Variable(_Strict):
    type: Literal["datasource", "query"]
    name: str = Field(pattern=r"^[a-z_]+$")
    label: str
    query: str | VariableQuery
    current: dict[str, Any]
    hide: int
    refresh: Literal[1, 2]
    regex: str
    options: list[Any]
    skip_url_sync: bool = Field(alias="skipUrlSync")
    datasource: Datasource | None = None
    definition: str | None = None
    include_all: bool | None = Field(None, alias="includeAll")
    multi: bool | None = None
    all_value: str | None = Field(None, alias="allValue")
    sort: int | None = None


class Templating(_Strict):
    list: list[Variable]


class Dashboard(_Strict):
    uid: str = Field(pattern=r"^oppen-[a-z-]+$", max_length=40)
    title: str = Field(pattern=r"^Oppen / ")
    description: str = Field(min_length=1)
    tags: list[str]
    timezone: str
    editable: bool
    graph_tooltip: int = Field(alias="graphTooltip")
    schema_version: int = Field(alias="schemaVersion")
    version: int
    refresh: str
    time: dict[str, str]
    timepicker: dict[str, Any]
    fiscal_year_start_month: int = Field(alias="fiscalYearStartMonth")
    live_now: bool = Field(alias="liveNow")
    week_start: str = Field(alias="weekStart")
    links: list[dict[str, Any]]
    annotations: dict[str, Any]
    templating: Templating
    panels: list[Panel] = Field(min_length=1)


def load(name: str) -> Dashboard:
    return Dashboard.model_validate(json.loads((DASHBOARDS / name).read_text()))


def queries(dashboard: Dashboard) -> dict[str, str]:
    """Every PromQL of the dashboard: panel targets and variable queries (`label_values(expr, label)`'s expr)."""
    found = {f"panel{panel.id}_{t.ref_id}": t.expr for panel in dashboard.panels for t in panel.targets}
    for variable in dashboard.templating.list:
        if variable.type == "query":
            inner = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable.query.query)
            assert inner, f"variable {variable.name}: label_values(<selector>, <label>) expected"
            found[f"var_{variable.name}"] = inner[1]
    return found


def read_metrics(dashboard: Dashboard) -> set[str]:
    return {metric for expr in queries(dashboard).values() for metric in metric_names(substituted(expr, dashboard))}


def substituted(expr: str, dashboard: Dashboard) -> str:
    """The query as Grafana sends it with every variable at a value ("All" is `.*`)."""
    names = {variable.name for variable in dashboard.templating.list}

    def value(match: re.Match) -> str:
        name = match[1] or match[2]
        if name in BUILTINS:
            return BUILTINS[name]
        assert name in names, f"${name} is not a variable of {dashboard.uid}"
        return ".*"

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


# --- the files --------------------------------------------------------------------------------------


def test_the_four_dashboards_have_their_stable_uids():
    assert sorted(path.name for path in DASHBOARDS.glob("*.json")) == sorted(EXPECTED)
    for name, uid in EXPECTED.items():
        dashboard = load(name)
        assert dashboard.uid == uid and dashboard.schema_version == SCHEMA_VERSION and "oppen" in dashboard.tags


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_panels_sit_on_the_grid_without_overlapping(name):
    panels = load(name).panels
    ids = [panel.id for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    boxes = [(p.title, p.grid_pos) for p in panels]
    for i, (title, a) in enumerate(boxes):
        for other, b in boxes[i + 1:]:
            apart = a.x + a.w <= b.x or b.x + b.w <= a.x or a.y + a.h <= b.y or b.y + b.h <= a.y
            assert apart, f"{title!r} overlaps {other!r}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_query_is_on_the_datasource_variable(name):
    dashboard = load(name)
    assert [v.name for v in dashboard.templating.list][0] == "datasource"
    assert dashboard.templating.list[0].query == "prometheus"
    for panel in dashboard.panels:
        if panel.type != "row":
            assert panel.datasource.model_dump() == DATASOURCE, panel.title
            assert all(target.datasource.model_dump() == DATASOURCE for target in panel.targets), panel.title
    for variable in dashboard.templating.list[1:]:
        assert variable.datasource.model_dump() == DATASOURCE, variable.name


@needs_promtool
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_query_parses_and_reads_only_served_metrics(name, tmp_path):
    dashboard = load(name)
    exprs = {key: substituted(expr, dashboard) for key, expr in queries(dashboard).items()}
    result = check_expressions(exprs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for key, expr in exprs.items():
        names = metric_names(expr)
        assert names and names <= KNOWN_METRICS, f"{name} {key}: {sorted(names - KNOWN_METRICS)}"


@needs_promtool
def test_a_query_that_does_not_parse_or_a_metric_nobody_serves_is_caught(tmp_path):
    """The two checks above are not vacuous."""
    assert check_expressions({"bad": "sum by (team (oppen_run_gpus)"}, tmp_path).returncode != 0
    assert metric_names('sum(rate(oppen_runs_gpu{team=~".*"}[1m])) / up') - KNOWN_METRICS == {"oppen_runs_gpu"}
    with pytest.raises(AssertionError, match=r"\$tema is not a variable"):
        substituted('oppen_run_gpus{team=~"$tema"}', load("resource-usage.json"))


def test_each_alert_has_a_panel_that_shows_what_it_watches():
    """Whoever gets an alert finds its figures on a dashboard: each rule's metrics appear in some panel."""
    shown = set()
    for name in EXPECTED:
        dashboard = load(name)
        shown |= read_metrics(dashboard)
    for manifest in prometheus_rules().values():
        for rule in (rule for group in rule_groups(manifest) for rule in group["rules"]):
            assert metric_names(rule["expr"]) <= shown, rule["alert"]


# --- shipping them ------------------------------------------------------------------------------------


def _build_monitoring() -> list[dict]:
    result = subprocess.run([KUBECTL, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (.ci/run installs it)")
def test_kustomize_ships_each_dashboard_as_a_configmap_the_sidecar_loads():
    from work_pools.render import validate_manifest

    objects = _build_monitoring()
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"
            and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"}
    shipped = {key: value for cm in maps.values() for key, value in cm["data"].items()}
    assert shipped == {name: (DASHBOARDS / name).read_text() for name in EXPECTED}
    assert all(len(cm["data"]) == 1 and cm["metadata"]["annotations"]["grafana_folder"] == "Oppen"
               for cm in maps.values())
    kinds = {o["kind"] for o in objects}
    assert {"PrometheusRule", "AlertmanagerConfig", "ServiceMonitor", "PodMonitor"} <= kinds
    assert len([o for o in objects if o["kind"] == "PrometheusRule"]) == len(prometheus_rules())
    for obj in objects:
        assert obj["metadata"]["namespace"] == "ml-training", obj["metadata"]["name"]
        if not obj["apiVersion"].startswith("monitoring.coreos.com/"):  # the operator's CRDs: no schema here
            validate_manifest(obj)
    receiver = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "oppen-alert-receiver")
    container = receiver["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:3] == ["python", "-m", "oppen.alerts.receiver"]
    [route] = [o for o in objects if o["kind"] == "AlertmanagerConfig"]
    url = route["spec"]["receivers"][0]["webhookConfigs"][0]["url"]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "oppen-alert-receiver")
    assert url == f"http://oppen-alert-receiver.ml-training.svc:{service['spec']['ports'][0]['port']}/alertmanager"


def test_the_provisioning_file_loads_the_folder_the_dashboards_are_copied_to():
    provisioning = yaml.safe_load((MONITORING / "grafana" / "dashboards.yaml").read_text())
    assert provisioning["apiVersion"] == 1
    [provider] = provisioning["providers"]
    assert provider["type"] == "file" and provider["folder"] == "Oppen" and provider["options"]["path"].startswith("/")


# --- Prefect's metric names, checked against a real server --------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_the_prefect_metrics_the_dashboards_read_are_served_by_a_real_server(tmp_path):
    """A `prefect server start` with PREFECT_SERVER_METRICS_ENABLED=true serves every Prefect name used."""
    from tests.stack import PrefectStack

    used = set()
    for name in EXPECTED:
        dashboard = load(name)
        used |= read_metrics(dashboard)
    used &= PREFECT_SERVER_METRICS
    assert used, "the dashboards read none of Prefect's metrics"
    stack = PrefectStack(tmp_path)
    stack.env["PREFECT_SERVER_METRICS_ENABLED"] = "true"
    try:
        stack.start_server()
        text = httpx.get(f"{stack.api_url}/metrics", timeout=30).text
    finally:
        stack.stop()
    served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert used <= served, sorted(used - served)
    assert served & PREFECT_SERVER_METRICS, "the recorded names no longer match what Prefect serves"
    print(f"\nPrefect serves {len(served)} series names; the dashboards read {sorted(used)}", file=sys.stderr)
