"""Metric families built from the catalog at collection time, so an exporter can only serve catalog names.

Both exporters keep plain values and turn them into Prometheus families when scraped (a custom
collector), rather than holding `Gauge` objects updated in place: the training loop then pays for
an attribute write per step, never a lock, and a series that has no value yet is simply absent.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from oppen.metrics.catalog import ALL


class Families:
    """The samples of one collection, grouped into the catalog's families (in the order first added)."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def add(self, name: str, value: float, **labels: str) -> None:
        """One sample of catalog metric `name`; labels must be exactly the catalog's label set."""
        spec = ALL[name]
        if set(labels) != set(spec.labels):
            # A wrong label set would silently fork a series that alert rules and dashboards read.
            raise ValueError(f"{name} takes labels {spec.labels}, got {tuple(labels)}")
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = _new_family(name)
        family.add_metric([str(labels[label]) for label in spec.labels], float(value))

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._families.values())


def _new_family(name: str) -> Metric:
    spec = ALL[name]
    if spec.kind == "counter":
        # prometheus_client appends `_total` to a counter family's samples; the catalog names the series.
        return CounterMetricFamily(spec.name.removesuffix("_total"), spec.help, labels=spec.labels)
    return GaugeMetricFamily(spec.name, spec.help, labels=spec.labels)
