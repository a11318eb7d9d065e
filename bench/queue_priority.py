"""Queue priority, pool limit and dispatch latency on a real local Prefect server + process worker.

    .venv/bin/python -m bench.queue_priority [--runs 200] [--limit 2] [--latency-runs 10]
    .venv/bin/python bench/queue_priority.py ...          (the same)

Phase 1: `--runs` short probe runs across urgent / normal / background (20/40/40 %), submitted
faster than a pool limit of `--limit` can serve them, so a backlog builds and priority matters.
Reports priority-order violations, limit violations and the queue wait per priority.
Phase 2 (side by side, same machine, same run): dispatch latency with nothing queued, submission
to the flow's first line, with the worker polling every 1 s (tuned) and every 10 s (Prefect's default).
Needs no dataset. The defaults take over 10 minutes on a 2-core machine; `--runs 6 --latency-runs 1` is a
smoke run (a few minutes, most of it starting workers and waiting on their polls).
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root in bench/'s place, see bench/__init__.py
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402

from bench.common import positive_int, table  # noqa: E402
from bench.queue_probe import (  # noqa: E402
    POOL,
    collect,
    deploy,
    max_concurrency,
    priority_violations,
    submit,
    wait_finished,
    write_pools_file,
)
from tests.stack import BIN, PrefectStack  # noqa: E402

MIX = [("urgent", 0.2), ("normal", 0.4), ("background", 0.4)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def start_worker(stack: PrefectStack, name: str, query_seconds: float):
    stack.env["PREFECT_WORKER_QUERY_SECONDS"] = str(query_seconds)
    return stack.spawn(name, [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process",
                              "--name", name])


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except Exception:
        process.kill()


async def load_phase(stack, deployments, records: Path, runs: int, interval: float, seed: int):
    rng = random.Random(seed)
    worker = start_worker(stack, "load-worker", 1)
    submitted = {}
    async with get_client() as client:
        for i in range(runs):
            queue = rng.choices([q for q, _ in MIX], weights=[w for _, w in MIX])[0]
            label = f"load-{i:03d}-{queue}"
            submitted[label] = (await submit(client, deployments[queue], records, label, 0.2), queue)
            await asyncio.sleep(interval)
        await wait_finished(client, [i for i, _ in submitted.values()], timeout=60 * 30)
        times = await collect(client, submitted, records)
    stop(worker)
    return times


async def latency_phase(stack, deployments, records: Path, runs: int, query_seconds: float, tag: str,
                        job_variables: dict | None = None):
    worker = start_worker(stack, f"latency-worker-{tag}", query_seconds)
    await asyncio.sleep(3)  # let it register and go idle
    latencies = []
    async with get_client() as client:
        for i in range(runs):
            label = f"latency-{tag}-{i:02d}"
            flow_run_id = await submit(client, deployments["normal"], records, label, 0.0, job_variables)
            await wait_finished(client, [flow_run_id], timeout=300)
            (run,) = await collect(client, {label: (flow_run_id, "normal")}, records)
            latencies.append(run.began - run.submitted)
            await asyncio.sleep(random.uniform(0, query_seconds))  # do not phase-lock with the poll
    stop(worker)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=200, help="phase 1: probe runs across the queues")
    parser.add_argument("--limit", type=positive_int, default=2, help="phase 1: the pool's concurrency limit")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between submissions in phase 1")
    parser.add_argument("--latency-runs", type=positive_int, default=10, help="phase 2: runs per worker setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="one line per phase-1 run")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="oppen-bench-queue-"))
    stack = PrefectStack(root)
    try:
        stack.start_server()
        stack.run(sys.executable, "-m", "work_pools.apply", "--file", str(write_pools_file(root, args.limit)))
        records = root / "records"
        records.mkdir()
        with temporary_settings({PREFECT_API_URL: stack.api_url}):
            async def run_all():
                async with get_client() as client:
                    deployments = await deploy(client)
                started = time.perf_counter()
                times = await load_phase(stack, deployments, records, args.runs, args.interval, args.seed)
                load_seconds = time.perf_counter() - started
                tuned = await latency_phase(stack, deployments, records, args.latency_runs, 1, "tuned")
                default = await latency_phase(stack, deployments, records, args.latency_runs, 10, "default")
                # Prefect's own process command: one Python process instead of the
                # `prefect flow-run execute` supervisor + engine, but SIGTERM crashes the run.
                engine = await latency_phase(stack, deployments, records, args.latency_runs, 1, "engine",
                                             {"command": "python -m prefect.engine"})
                return times, load_seconds, tuned, default, engine

            times, load_seconds, tuned, default, engine = asyncio.run(run_all())
    finally:
        stack.stop()

    if args.verbose:
        for r in sorted(times, key=lambda r: r.created):
            print(f"{r.label:<24} wait {r.claimed - r.created:6.2f}  claim->running {r.started - r.claimed:5.2f}  "
                  f"running->first line {r.began - r.started:5.2f}  first line->end {r.ended - r.began:5.2f}")
    violations = priority_violations(times)
    peak = max_concurrency(times)
    print(f"\nphase 1: {len(times)} runs, pool limit {args.limit}, {load_seconds:.0f}s, worker polling every 1 s\n")
    rows = []
    for queue, _ in MIX:
        waits = [r.claimed - r.created for r in times if r.queue == queue]
        dispatch = [r.began - r.submitted for r in times if r.queue == queue]
        rows.append([queue, len(waits), percentile(waits, 0.5), percentile(waits, 0.95),
                     percentile(dispatch, 0.5), percentile(dispatch, 0.95)])
    print(table(["queue", "runs", "wait p50 s", "wait p95 s", "to first line p50 s", "p95 s"], rows))
    print(f"\npriority-order violations: {len(violations)}   limit violations: {max(0, peak - args.limit)} "
          f"(most runs holding a slot at once: {peak})")
    print(f"\nphase 2: dispatch latency with nothing queued, submission -> flow's first line, {args.latency_runs} runs each\n")
    print(table(["worker polling", "p50 s", "p95 s", "mean s"], [
        ["every 1 s (tuned)", percentile(tuned, 0.5), percentile(tuned, 0.95), statistics.mean(tuned)],
        ["every 10 s (Prefect default)", percentile(default, 0.5), percentile(default, 0.95), statistics.mean(default)],
        ["every 1 s, python -m prefect.engine", percentile(engine, 0.5), percentile(engine, 0.95), statistics.mean(engine)],
    ]))
    print(f"\ntuned / default p50: {percentile(tuned, 0.5) / percentile(default, 0.5):.2f}   "
          f"supervised / engine-only p50: {percentile(tuned, 0.5) / percentile(engine, 0.5):.2f}")
    if violations:
        print("violations (claimed, passed over):", violations[:10])


if __name__ == "__main__":
    main()
