"""Create or update the work pools, queues and global concurrency limits of pools.yaml on a Prefect server. Idempotent.

    python -m work_pools.apply [--file work_pools/pools.yaml]

Prints one line per change; a second run against the same server prints "no changes".
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    WorkPoolCreate,
    WorkPoolUpdate,
    WorkQueueUpdate,
)
from prefect.exceptions import ObjectNotFound

from work_pools.spec import DEFAULT_POOLS_FILE, GlobalLimitSpec, PoolSpec, load_pools


async def _apply_pool(client, spec: PoolSpec, base_dir: Path) -> list[str]:
    changes: list[str] = []
    template = spec.template(base_dir)
    try:
        pool = await client.read_work_pool(spec.name)
    except ObjectNotFound:
        await client.create_work_pool(
            WorkPoolCreate(
                name=spec.name, type=spec.type, base_job_template=template,
                description=spec.description, concurrency_limit=spec.concurrency_limit,
            )
        )
        changes.append(f"created pool {spec.name} ({spec.type})")
    else:
        if pool.type != spec.type:
            raise ValueError(f"pool {spec.name} exists with type {pool.type}, pools file says {spec.type}")
        update = {}
        if pool.base_job_template != template:
            update["base_job_template"] = template
        if pool.description != spec.description:
            update["description"] = spec.description
        if pool.concurrency_limit != spec.concurrency_limit:
            update["concurrency_limit"] = spec.concurrency_limit
        if update:
            await client.update_work_pool(spec.name, WorkPoolUpdate(**update))
            changes.append(f"updated pool {spec.name}: {', '.join(sorted(update))}")

    # Highest priority first: the server renumbers queues around a new priority, so this order
    # converges in one pass.
    for queue in sorted(spec.queues, key=lambda q: q.priority):
        try:
            existing = await client.read_work_queue_by_name(queue.name, work_pool_name=spec.name)
        except ObjectNotFound:
            await client.create_work_queue(
                name=queue.name, work_pool_name=spec.name, priority=queue.priority,
                description=queue.description, concurrency_limit=queue.concurrency_limit,
            )
            changes.append(f"created queue {spec.name}/{queue.name} (priority {queue.priority})")
            continue
        update = {
            key: value
            for key, value in {
                "priority": queue.priority, "description": queue.description, "concurrency_limit": queue.concurrency_limit,
            }.items()
            if getattr(existing, key) != value
        }
        if update:
            await client.update_work_queue(existing.id, **WorkQueueUpdate(**update).model_dump(exclude_unset=True))
            changes.append(f"updated queue {spec.name}/{queue.name}: {', '.join(sorted(update))}")
    return changes


async def _apply_limit(client, spec: GlobalLimitSpec) -> list[str]:
    try:
        existing = await client.read_global_concurrency_limit_by_name(spec.name)
    except ObjectNotFound:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=spec.name, limit=spec.limit))
        return [f"created concurrency limit {spec.name} ({spec.limit} slots)"]
    if existing.limit == spec.limit and existing.active:
        return []
    # Slots held by running flows stay held: only the limit (and active flag) change.
    await client.update_global_concurrency_limit(spec.name, GlobalConcurrencyLimitUpdate(limit=spec.limit, active=True))
    return [f"updated concurrency limit {spec.name}: {existing.limit} -> {spec.limit} slots"]


async def apply_pools(path: Path = DEFAULT_POOLS_FILE) -> list[str]:
    pools = load_pools(path)
    changes: list[str] = []
    async with get_client() as client:
        for spec in pools.pools:
            changes += await _apply_pool(client, spec, Path(path).parent)
        for limit in pools.concurrency_limits:
            changes += await _apply_limit(client, limit)
    return changes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_POOLS_FILE)
    args = parser.parse_args(argv)
    changes = asyncio.run(apply_pools(args.file))
    print("\n".join(changes) if changes else "no changes")


if __name__ == "__main__":
    main()
