"""The run exporter: a training run serves its own `oppen_training_*` and `oppen_run_*` metrics while it lives.

    with RunExporter(identity, resources, port=0, targets_dir=..., cost=lambda: budget_reading(budget)) as metrics:
        train(..., callbacks=[..., *metrics.callbacks(expected_epoch_seconds=...)])

Served by the flow-run process itself, not by a central exporter, because these series carry the
flow-run id: they exist exactly while the run does, so their cardinality is the number of runs in
flight, and when the process ends (completed, failed, preempted, killed) its target is gone and
Prometheus marks its series stale at once. Locally the run is found through a file_sd target
(`file_sd.py`); on Kubernetes a PodMonitor scrapes the training pod's named port.

One owner for the lifecycle: entering starts the resource sampler and the HTTP server (on its own
registry, so nothing else in the process leaks into a run's series) and publishes the target;
leaving, on every exit, removes the target first (Prometheus stops asking), then stops the server
and the sampler. Monitoring never fails a run: a port that cannot be bound or a target that cannot
be written is one warning line, and training goes on without the exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import Metric
from pydantic import BaseModel, ConfigDict, Field

from oppen.cost.price_book import Resources
from oppen.metrics.catalog import RUN_LABELS
from oppen.metrics.families import Families
from oppen.metrics.file_sd import prune_stale_targets, remove_target, write_target
from oppen.metrics.resource_sampler import SAMPLE_EVERY_S, ResourceSampler
from oppen.metrics.run_cost import CostReading
from oppen.metrics.training_metrics import TrainingMetrics
from training.callbacks import Callback

log = logging.getLogger("oppen.metrics")

# A flow-run id (a UUID, or `adhoc-<uuid>` outside Prefect) names the target file: nothing that could leave the dir.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class RunIdentity(BaseModel):
    """The labels every run series carries (catalog.RUN_LABELS, in that order)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flow_run_id: str = Field(pattern=RUN_ID_PATTERN, description="Prefect's flow-run id.")
    workload: str = Field(min_length=1, description="mnist, lm, ...")
    experiment: str = Field(min_length=1, description="The MLflow experiment, as budgets name it.")
    team: str = Field(min_length=1, description="The team that pays.")

    def labels(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in RUN_LABELS}


class RunCollector:
    """Turns the run's current figures into samples on each scrape (prometheus_client's custom-collector API)."""

    def __init__(self, identity: RunIdentity, sampler: ResourceSampler,
                 cost: Callable[[], CostReading | None] | None) -> None:
        self.labels = identity.labels()
        self.sampler = sampler
        self.cost = cost
        self.training: TrainingMetrics | None = None
        self._cost_failing = False

    def collect(self) -> Iterator[Metric]:
        families = Families()
        if self.training is not None:
            self.training.collect(families, self.labels)
        self.sampler.collect(families, self.labels)
        reading = self._read_cost()
        if reading is not None:
            reading.collect(families, self.labels)
        return iter(families)

    def _read_cost(self) -> CostReading | None:
        if self.cost is None:
            return None
        try:
            reading = self.cost()
        except Exception:  # noqa: BLE001 - a broken reader costs the cost series, not the scrape
            if not self._cost_failing:
                log.warning("reading the run's cost for its metrics failed; the cost series are left out",
                            exc_info=True)
            self._cost_failing = True
            return None
        self._cost_failing = False
        return reading


class RunExporter:
    """Serves one run's metrics on `host:port` between `__enter__` and `__exit__`; `port=None` switches it off."""

    def __init__(
        self,
        identity: RunIdentity,
        resources: Resources,
        *,
        port: int | None = 0,
        host: str = "127.0.0.1",
        targets_dir: Path | None = None,
        cost: Callable[[], CostReading | None] | None = None,
        sample_every_s: float = SAMPLE_EVERY_S,
    ) -> None:
        self.identity = identity
        self.requested_port = port
        self.host = host
        self.targets_dir = Path(targets_dir) if targets_dir is not None else None
        self.sampler = ResourceSampler(resources, every_s=sample_every_s)
        self.collector = RunCollector(identity, self.sampler, cost)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.port: int | None = None  # the port it listens on, once it does
        self.target: Path | None = None
        self._server = None
        self._thread = None

    @property
    def serving(self) -> bool:
        return self._server is not None

    @property
    def address(self) -> str | None:
        """host:port as a scraper on this machine reaches it (loopback when it listens on every address)."""
        if self.port is None:
            return None
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def callbacks(self, expected_epoch_seconds: float | None = None) -> list[Callback]:
        """The training callback feeding this exporter ([] when it is off); one per training call."""
        if not self.serving:
            return []
        self.collector.training = TrainingMetrics(expected_epoch_seconds)
        return [self.collector.training]

    def __enter__(self) -> RunExporter:
        if self.requested_port is None:
            return self
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)  # nothing started may outlive a failed start
            raise
        return self

    def _start(self) -> None:
        self.sampler.start()
        try:
            self._server, self._thread = start_http_server(self.requested_port, addr=self.host, registry=self.registry)
        except OSError as error:
            log.warning("run metrics are off for this run: %s:%s could not be bound (%s)", self.host,
                        self.requested_port, error.strerror or error)
            self.sampler.stop()
            return
        self.port = self._server.server_address[1]
        self._publish_target()
        log.info("run metrics at http://%s/metrics", self.address)

    def __exit__(self, exc_type, exc, tb) -> bool:
        # Each step on its own: a failure to clean one up must neither skip the others nor hide why the run ended.
        for step in (self._withdraw_target, self._stop_server, self.sampler.stop):
            try:
                step()
            except Exception:  # noqa: BLE001
                log.warning("stopping the run's metrics: %s failed", step.__name__, exc_info=True)
        return False

    def _publish_target(self) -> None:
        if self.targets_dir is None:
            return
        try:
            prune_stale_targets(self.targets_dir)
            self.target = write_target(self.targets_dir, self.identity.flow_run_id, self.address)
        except OSError as error:
            log.warning("run metrics are served at %s but Prometheus will not find them: the target could not be "
                        "written to %s (%s)", self.address, self.targets_dir, error)

    def _withdraw_target(self) -> None:
        if self.target is not None:
            remove_target(self.target)
            self.target = None

    def _stop_server(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)
        self._server = self._thread = None
