"""infra/helm/prefect-server-values.yaml: several server replicas only with everything per-process moved to
Redis, the same Redis wiring the integration tier runs end to end (tests/prefect_backends.py), setting
names and modules that exist in the Prefect this project pins, and the Secrets its header tells an
operator to create being the ones the values read. The chart is not rendered here (no helm); the keys
follow prefect-helm's values.yaml, and what the chart derives from them is restated below."""

from __future__ import annotations

import importlib
import re
from importlib.metadata import version

import pytest
import yaml

from tests.prefect_backends import redis_messaging_env
from work_pools.render import PROJECT_DIR

VALUES_FILE = PROJECT_DIR / "infra" / "helm" / "prefect-server-values.yaml"
REDIS_BROKER = "prefect_redis.messaging"
# What prefect-helm's `backgroundServices.envVars` adds to the API and background-services pods when
# runAsSeparateDeployment is on and the broker is prefect_redis.messaging (besides the broker and cache).
CHART_ADDS_WITH_REDIS_BROKER = {
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
}
# What Prefect imports from each pluggable module (prefect.server's loaders).
MODULE_EXPORTS = {
    "prefect_redis.messaging": ("Publisher", "Consumer", "Cache"),
    "prefect_redis.ordering": ("CausalOrdering",),
    "prefect_redis.lease_storage": ("ConcurrencyLeaseStorage",),
    "prefect_redis.cleanup_queue": ("WorkerCleanupQueue",),
}


@pytest.fixture(scope="module")
def values() -> dict:
    return yaml.safe_load(VALUES_FILE.read_text())


def _env(values: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in values["global"]["prefect"].get("env", [])}


def _replicas(values: dict) -> int:
    return max(values["server"].get("replicaCount", 1), values["backgroundServices"].get("replicaCount", 1))


def test_several_replicas_share_events_leases_docket_and_cleanup_through_redis(values):
    assert _replicas(values) > 1  # the production shape this file is for
    services = values["backgroundServices"]
    # Without a separate Deployment the chart gives the API pods none of the Redis settings.
    assert services["runAsSeparateDeployment"] is True
    messaging = services["messaging"]
    assert (messaging["broker"], messaging["cache"]) == (REDIS_BROKER, REDIS_BROKER)
    assert values["redis"]["enabled"] or messaging["redis"]["host"], "a broker needs a Redis to talk to"
    assert values["redis"].get("architecture", "standalone") == "standalone"  # the only one Prefect supports
    docket = messaging["docket"]
    assert docket.get("url") or docket.get("existingSecret"), "Docket left on memory:// runs services per replica"
    env = _env(values)
    assert env["PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE"]["value"] == "prefect_redis.cleanup_queue"
    assert "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL" in env


def test_the_production_wiring_is_the_one_the_integration_tier_runs(values):
    """Every setting tests/prefect_backends.py gives the PostgreSQL + Redis server (which runs the MNIST
    deployment and survives restarts there) is set here too, by the values or by the chart from them."""
    messaging = values["backgroundServices"]["messaging"]
    set_here = {"PREFECT_MESSAGING_BROKER": messaging["broker"], "PREFECT_MESSAGING_CACHE": messaging["cache"],
                **CHART_ADDS_WITH_REDIS_BROKER,
                **{name: entry.get("value") for name, entry in _env(values).items()}}
    tested = redis_messaging_env("redis://redis.example:6379/0")
    urls = {"PREFECT_REDIS_MESSAGING_URL": "the chart's host/port/db/password",
            "PREFECT_SERVER_DOCKET_URL": "backgroundServices.messaging.docket"}
    for name, value in tested.items():
        if name in urls:
            continue  # connection details: set by the chart from the values named above
        assert name in set_here, f"{name} is set in the tested server but not in production"
        if not name.endswith("_URL"):
            assert set_here[name] == value, name


@pytest.mark.parametrize("module, exports", MODULE_EXPORTS.items())
def test_every_module_the_server_is_pointed_at_exists_in_the_pinned_prefect_redis(module, exports):
    loaded = importlib.import_module(module)
    for name in exports:
        assert hasattr(loaded, name), f"{module} has no {name}"


def test_setting_names_are_ones_prefect_reads(values):
    from prefect.settings import Settings
    from prefect_redis.cleanup_queue import RedisWorkerCleanupQueueSettings

    known = {f"PREFECT_{'_'.join(path).upper()}" for path in _setting_paths(Settings)}
    known |= {f"PREFECT_REDIS_WORKER_CLEANUP_QUEUE_{field.upper()}"
              for field in RedisWorkerCleanupQueueSettings.model_fields}
    for name in _env(values):
        assert name in known, f"{name} is not a Prefect setting: a typo is silently ignored"


def test_the_server_runs_the_prefect_version_the_flows_are_built_with(values):
    image = values["global"]["prefect"]["image"]  # where the chart reads it (a `server.image` is ignored)
    assert "image" not in values["server"]
    assert re.fullmatch(r"\d+\.\d+\.\d+-python3\.\d+", image["prefectTag"])  # X.Y.Z: the chart refuses others
    assert image["prefectTag"].split("-")[0] == version("prefect")


def test_the_database_is_the_platform_postgresql_from_a_secret(values):
    assert values["postgresql"]["enabled"] is False and values.get("sqlite", {}).get("enabled") is not True
    database = values["externalDatabase"]
    assert database["existingSecret"] and database["connectionStringSecretKey"]
    assert values["secret"]["create"] is False  # the chart would otherwise make an empty connection Secret


def test_the_secrets_the_header_tells_operators_to_create_are_the_ones_the_values_read(values):
    header = "\n".join(line.lstrip("# ") for line in VALUES_FILE.read_text().splitlines() if line.startswith("#"))
    created = {}
    for name, literals in re.findall(r"create secret generic (\S+)((?:\s*\\?\s*--from-literal=[\w-]+=\S+)+)", header):
        created[name] = set(re.findall(r"--from-literal=([\w-]+)=", literals))
        assert not re.search(r"--from-literal=[\w-]+=[^$\s]*:[^$/\s]+@", literals), "a literal password in the docs"
    read = {(values["externalDatabase"]["existingSecret"], values["externalDatabase"]["connectionStringSecretKey"]),
            (values["backgroundServices"]["messaging"]["docket"]["existingSecret"],
             values["backgroundServices"]["messaging"]["docket"]["existingSecretKey"]),
            (values["redis"]["auth"]["existingSecret"], values["redis"]["auth"]["existingSecretPasswordKey"])}
    read |= {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
             for e in _env(values).values() if "valueFrom" in e}
    for name, key in read:
        assert key in created.get(name, set()), f"the values read {name}/{key}, which the header never creates"
    # The chart reads the bundled Redis' password from the Secret named after it (<release>-redis).
    assert values["redis"]["auth"]["existingSecret"] == "prefect-server-redis"
    assert "postgresql+asyncpg://" in header


def _setting_paths(model, prefix: tuple[str, ...] = ()):
    from pydantic_settings import BaseSettings

    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseSettings):
            yield from _setting_paths(annotation, prefix + (name,))
        else:
            yield prefix + (name,)
