"""Queue priority and pool limits through a real Prefect server and a real process worker, and
bad job variables refused before a flow run exists."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from bench.queue_probe import POOL, collect, deploy, max_concurrency, priority_violations, submit, wait_finished, write_pools_file
from tests.stack import BIN

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_urgent_run_starts_next_and_the_pool_limit_holds(stack, tmp_path):
    pools_file = write_pools_file(tmp_path, pool_limit=1)
    stack.run(sys.executable, "-m", "work_pools.apply", "--file", str(pools_file))
    records = tmp_path / "records"
    records.mkdir()

    async def scenario():
        async with get_client() as client:
            deployments = await deploy(client)
            runs = {}
            for i in range(4):  # fill background before any worker polls
                label = f"background-{i}"
                # Long enough that the urgent run is queued while the first still holds the pool's one slot,
                # however slowly this machine reads the runs back (1.5 s was not, under CI's load).
                runs[label] = (await submit(client, deployments["background"], records, label, 5.0), "background")
            stack.spawn("probe-worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"])
            deadline = time.monotonic() + 120
            # Claimed (Pending) is the earliest sign the worker took one; the urgent run goes in right then.
            while all(r.state.is_scheduled() for r in [await client.read_flow_run(i) for i, _ in runs.values()]):
                assert time.monotonic() < deadline, stack.log("probe-worker")
                await asyncio.sleep(0.2)
            runs["urgent"] = (await submit(client, deployments["urgent"], records, "urgent", 0.2), "urgent")
            await wait_finished(client, [i for i, _ in runs.values()], timeout=300)
            return await collect(client, runs, records)

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        times = asyncio.run(scenario())
    order = [r.label for r in sorted(times, key=lambda r: r.claimed)]
    assert order[0].startswith("background") and order[1] == "urgent", order
    assert max_concurrency(times) == 1, sorted((r.claimed, r.ended, r.label) for r in times)
    assert priority_violations(times) == []


def test_bad_job_variables_are_refused_before_a_flow_run_exists(stack):
    from oppen.submit import submit as oppen_submit
    from work_pools.job_variables import JobVariablesError

    async def count_runs():
        async with get_client() as client:
            return len(await client.read_flow_runs())

    with temporary_settings({PREFECT_API_URL: stack.api_url}):
        before = asyncio.run(count_runs())
        for variables, queue, message in [
            ({"gpu_count": -1}, None, "gpu_count: -1 is less than the minimum of 1"),
            ({"priority_class_name": "vip"}, None, "'vip' is not one of"),
            ({"tolerations": [{"key": "a", "operator": "Sometimes"}]}, None, "'Sometimes' is not one of"),
            ({}, "urgnet", "unknown queue 'urgnet'"),
        ]:
            with pytest.raises(JobVariablesError, match=message):
                asyncio.run(oppen_submit("train-mnist/gpu", job_variables=variables, queue=queue))
        with pytest.raises(JobVariablesError, match="unknown queue 'gpu'"):
            asyncio.run(oppen_submit("train-mnist/local", queue="gpu"))
        assert asyncio.run(count_runs()) == before


def test_a_run_holds_one_gpu_slot_per_gpu_and_releases_them(in_process):
    from prefect import flow

    from tasks.gpu_slots import GPU_SLOTS_LIMIT, GpuSlots

    def active_slots() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(GPU_SLOTS_LIMIT).active_slots

    seen = {}

    @flow
    def holds(gpus: int) -> None:
        with GpuSlots(gpus) as slots:
            seen[gpus] = active_slots()
            slots.release()  # released early (once the model is saved); leaving the block is then a no-op
            seen[-gpus] = active_slots()

    holds(3)
    holds(0)  # CPU runs take no slot
    assert seen == {3: 3, -3: 0, 0: 0}
    assert active_slots() == 0
