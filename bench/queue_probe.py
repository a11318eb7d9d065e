"""A tiny flow and the harness around it, for measuring queue order, limits and dispatch latency on
a real Prefect server with a real process worker (used by bench/queue_priority.py and the queue test).

The probe's first line records when it began, so "dispatch latency" is submission to the flow's
first line of user code: the worker's poll, process start, imports and Prefect's engine start.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import yaml
from prefect import flow

POOL = "queue-probe"
QUEUES = {"urgent": 1, "normal": 2, "background": 3}
PROJECT_DIR = Path(__file__).resolve().parents[1]


@flow(name="queue-probe")
def queue_probe(record_dir: str, label: str, submitted_at: float, hold_seconds: float = 0.2) -> None:
    began = time.time()  # the flow's first line
    time.sleep(hold_seconds)
    Path(record_dir, f"{label}.json").write_text(json.dumps({"label": label, "submitted": submitted_at,
                                                             "began": began, "ended": time.time()}))


def write_pools_file(directory: Path, pool_limit: int) -> Path:
    """A pools file with one process pool (the local pool's template) and the three priority queues."""
    (directory / "local.json").write_text((PROJECT_DIR / "work_pools" / "local.json").read_text())
    path = directory / "pools.yaml"
    path.write_text(yaml.safe_dump({"pools": [{
        "name": POOL, "type": "process", "base_job_template": "local.json", "concurrency_limit": pool_limit,
        "queues": [{"name": name, "priority": priority} for name, priority in QUEUES.items()],
    }]}))
    return path


async def deploy(client) -> dict[str, UUID]:
    """One deployment of the probe per queue; returns queue -> deployment id."""
    flow_id = await client.create_flow_from_name("queue-probe")
    return {
        queue: await client.create_deployment(
            flow_id=flow_id, name=f"probe-{queue}", work_pool_name=POOL, work_queue_name=queue,
            entrypoint="bench/queue_probe.py:queue_probe", path=str(PROJECT_DIR),
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT_DIR)}}],
        )
        for queue in QUEUES
    }


async def submit(client, deployment_id: UUID, record_dir: Path, label: str, hold_seconds: float,
                 job_variables: dict | None = None) -> UUID:
    flow_run = await client.create_flow_run_from_deployment(
        deployment_id, parameters={"record_dir": str(record_dir), "label": label, "submitted_at": time.time(),
                                   "hold_seconds": hold_seconds}, job_variables=job_variables)
    return flow_run.id


@dataclass(frozen=True)
class RunTimes:
    label: str
    queue: str
    priority: int
    created: float    # server: the flow run exists (it waits from here)
    claimed: float    # server: a worker took it (Pending)
    started: float    # server: Running
    ended: float      # server: final state
    submitted: float  # client clock, just before the API call
    began: float      # the flow's first line


async def collect(client, flow_runs: dict[str, tuple[UUID, str]], record_dir: Path) -> list[RunTimes]:
    result = []
    for label, (flow_run_id, queue) in flow_runs.items():
        run = await client.read_flow_run(flow_run_id)
        states = await client.read_flow_run_states(flow_run_id)
        claimed = min(s.timestamp for s in states if s.type.value == "PENDING")
        record = json.loads(Path(record_dir, f"{label}.json").read_text())
        result.append(RunTimes(label, queue, QUEUES[queue], run.created.timestamp(), claimed.timestamp(),
                               run.start_time.timestamp(), run.end_time.timestamp(), record["submitted"],
                               record["began"]))
    return result


async def wait_finished(client, flow_run_ids, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(flow_run_ids)
    while pending:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} probe runs did not finish in {timeout:.0f}s")
        for flow_run_id in list(pending):
            state = (await client.read_flow_run(flow_run_id)).state
            if state is not None and state.is_final():
                if not state.is_completed():
                    raise RuntimeError(f"probe run {flow_run_id} ended {state.name}: {state.message}")
                pending.discard(flow_run_id)
        await asyncio.sleep(0.5)


def max_concurrency(runs: list[RunTimes]) -> int:
    """Most runs between claim and end at any instant (a claimed run holds a pool slot)."""
    events = sorted([(r.claimed, 1) for r in runs] + [(r.ended, -1) for r in runs], key=lambda e: (e[0], e[1]))
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def priority_violations(runs: list[RunTimes], slack: float = 0.25) -> list[tuple[str, str]]:
    """(claimed, passed over): a run was claimed while a higher-priority run was already waiting.

    `slack`: a run created within this long before the claim may have missed the worker's poll
    that chose the other one (the poll and the claim are a few milliseconds apart).
    """
    return [(x.label, y.label) for x in runs for y in runs
            if y.priority < x.priority and y.created + slack < x.claimed < y.claimed]
