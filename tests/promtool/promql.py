"""What the rule and dashboard tests share: the rule groups of the PrometheusRules, promtool, and the metric
names a PromQL expression reads (checked against what the exporters and Prefect serve)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from oppen.local_stack import PROJECT_DIR
from oppen.metrics.catalog import ALL

MONITORING = PROJECT_DIR / "infra" / "monitoring"
RULES = MONITORING / "rules"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool is absent: the monitoring tier "
                                    "needs Debian's prometheus package (.ci/run installs it)")

# What Prefect 3.8.8's server serves at /api/metrics (PREFECT_SERVER_METRICS_ENABLED=true), recorded from a
# real one: a fresh server serves the unlabelled ones; the worker channel's connection counter appears once
# a worker has connected. No flow-run metrics: those are the exporter's (oppen/metrics/catalog.py).
PREFECT_SERVER_METRICS = frozenset({
    "prefect_worker_channel_connections_total", "prefect_worker_channel_heartbeat_failures_total",
    "process_cpu_seconds_total", "process_max_fds", "process_open_fds", "process_resident_memory_bytes",
    "process_start_time_seconds", "process_virtual_memory_bytes", "python_gc_collections_total",
    "python_gc_objects_collected_total", "python_gc_objects_uncollectable_total", "python_info",
})
# Prometheus' own per-target series.
PROMETHEUS_METRICS = frozenset({"up"})
KNOWN_METRICS = frozenset(ALL) | PREFECT_SERVER_METRICS | PROMETHEUS_METRICS

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset", "inf", "nan"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBERS = re.compile(r"(?<![\w:])(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)(?![\w:])")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers that are not functions, keywords, label names,
    durations or numbers (Grafana's `$variables` must be substituted first)."""
    text = _STRINGS.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        following = text[match.end():].lstrip()[:1]
        if following != "(" and match.group().lower() not in _KEYWORDS:
            names.add(match.group())
    return names


def prometheus_rules() -> dict[str, dict]:
    """rules/<concern>.yaml -> its PrometheusRule manifest."""
    return {path.stem: yaml.safe_load(path.read_text()) for path in sorted(RULES.glob("*.yaml"))}


def rule_groups(manifest: dict) -> list[dict]:
    """The manifest's spec.groups: exactly what Prometheus loads (the operator passes them through)."""
    return manifest["spec"]["groups"]


def alerting_rules() -> list[dict]:
    return [rule for manifest in prometheus_rules().values() for group in rule_groups(manifest)
            for rule in group["rules"] if "alert" in rule]


def write_rule_file(groups: list[dict], path: Path) -> Path:
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def check_expressions(exprs: dict[str, str], directory: Path) -> subprocess.CompletedProcess:
    """`promtool check rules` over the expressions written as recording rules (name -> expr): Prometheus' own
    parser, without a server."""
    rules = [{"record": f"check:{name}", "expr": expr} for name, expr in exprs.items()]
    path = write_rule_file([{"name": "parse-check", "rules": rules}], directory / "parse-check.yaml")
    return promtool("check", "rules", str(path))
