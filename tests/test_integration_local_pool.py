"""Through a real `prefect server start`: pools, `prefect deploy`, a process worker, MLflow on SQLite."""

from __future__ import annotations

import asyncio
import json
import re
import sys

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SMALL_RUN = {"epochs": 1, "batch_size": 128, "learning_rate": 5e-3, "max_steps": 40, "log_every_steps": 10}


def _read_flow_run(stack, flow_run_id: str):
    return stack.read_flow_run(flow_run_id)


def _deployment_run(stack, *params: str, check: bool = True):
    argv = ["deployment", "run", "train-mnist/local", "--watch", "--watch-timeout", "240"]
    for param in params:
        argv += ["--param", param]
    result = stack.prefect(*argv, check=False, timeout=300)
    if check and result.returncode != 0:
        pytest.fail(f"deployment run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{stack.log('worker')}")
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    return result, match.group(1) if match else None


def test_pools_queues_and_limits_exist_as_declared_and_reapply_is_a_no_op(stack):
    from work_pools.spec import load_pools

    declared = load_pools()

    async def read():
        async with get_client() as client:
            pools = {spec.name: await client.read_work_pool(spec.name) for spec in declared.pools}
            queues = {spec.name: await client.read_work_queues(work_pool_name=spec.name) for spec in declared.pools}
            limits = {c.name: await client.read_global_concurrency_limit_by_name(c.name) for c in declared.concurrency_limits}
            return pools, queues, limits

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        pools, queues, limits = asyncio.run(read())
    for spec in declared.pools:
        pool = pools[spec.name]
        assert (pool.type, pool.concurrency_limit) == (spec.type, spec.concurrency_limit)
        assert pool.base_job_template == spec.template()
        # (Prefect also gives every pool a `default` queue of its own.)
        on_server = {q.name: (q.priority, q.concurrency_limit) for q in queues[spec.name] if q.name != "default"}
        assert on_server == {q.name: (q.priority, q.concurrency_limit) for q in spec.queues}
    assert {name: limit.limit for name, limit in limits.items()} == {c.name: c.limit for c in declared.concurrency_limits}
    assert pools["kubernetes-gpu"].type == "kubernetes" and "gpu_count" in pools["kubernetes-gpu"].base_job_template["variables"]["properties"]
    again = stack.run(sys.executable, "-m", "work_pools.apply")
    assert again.stdout.strip() == "no changes"


def test_mnist_deployment_trains_logs_and_registers(stack):
    result, flow_run_id = _deployment_run(stack, f"run={json.dumps(SMALL_RUN)}", "min_test_accuracy=0.5")
    assert "Completed" in result.stdout
    client = MlflowClient(tracking_uri=stack.tracking_uri, registry_uri=stack.tracking_uri)
    experiment = client.get_experiment_by_name("mnist")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["config.model"] == "default"
    assert run.data.params["run.max_steps"] == "40"
    # Checkpoints go under the platform's root, one folder per flow run (a request may only name a sub-folder).
    assert (stack.root / "oppen" / "checkpoints" / "mnist" / flow_run_id / "last.pt").exists()
    config = client.download_artifacts(run.info.run_id, "config.json")
    assert json.loads(open(config).read())["run"]["max_steps"] == 40
    for metric in ("train/loss", "train/epoch_loss", "val/accuracy", "train/epoch_seconds", "train/samples_per_second",
                   "test/accuracy"):
        assert metric in run.data.metrics, metric
    assert run.data.metrics["test/accuracy"] > 0.5
    # The model is logged in the run (MLflow 3 logged model) and loadable.
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert any(m.source_run_id == run.info.run_id for m in models)
    version = client.get_model_version_by_alias("mnist-cnn", "development")
    assert version.run_id == run.info.run_id
    assert version.tags["oppen.metric"] == "test_accuracy"
    # Per-epoch progress was visible on the flow run as artifacts.
    flow_run = _read_flow_run(stack, flow_run_id)
    assert flow_run.state.is_completed()


def test_schema_violations_are_rejected_before_a_run_is_created(stack):
    result, flow_run_id = _deployment_run(stack, 'run={"epochs": 0}', check=False)
    assert result.returncode != 0 and flow_run_id is None
    assert "epochs" in (result.stdout + result.stderr)


def test_missing_data_directory_fails_the_flow_run_with_the_reason(stack):
    result, flow_run_id = _deployment_run(stack, 'config={"data_dir": "/nonexistent/mnist"}', check=False)
    assert flow_run_id is not None
    flow_run = _read_flow_run(stack, flow_run_id)
    assert flow_run.state.is_failed()
    assert "/nonexistent/mnist does not exist" in flow_run.state.message
    assert "Traceback" not in flow_run.state.message
