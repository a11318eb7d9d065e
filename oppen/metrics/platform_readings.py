"""What the platform exporter reads on each poll: queues, workers, budgets and finished runs.

Through the same typed API the CLI and the MCP server use (`oppen.api`), so `oppen queue`, `oppen quota`
and the dashboards agree: queues from `get_job_queue_status`, budgets from the rows behind
`check_training_quota`. Every label these produce comes from configuration (pools, queues,
deployments, teams and their budgets), never from a run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from uuid import UUID

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import FlowFilter, FlowFilterId
from prefect.client.schemas.objects import StateType, WorkerStatus

from oppen.api import context
from oppen.api.queue_status import get_job_queue_status
from oppen.api.reports import BudgetStatus, budget_statuses
from oppen.cost.ledger import utcnow

FINAL_STATES = (StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED)
PAGE = 200
# Prefect's run history counts runs by state over intervals of their expected start; one interval that
# spans every run there can be gives the totals.
HISTORY_START = datetime(2000, 1, 1, tzinfo=timezone.utc)
HISTORY_END = datetime(2200, 1, 1, tzinfo=timezone.utc)


@dataclass(frozen=True)
class QueueReading:
    pool: str
    queue: str
    pending: int
    late: int
    running: int
    oldest_wait_s: float
    queued_cost_usd: float
    held_usd: float


def read_queues() -> list[QueueReading]:
    """Every queue of every pool, with what waits and runs there (get_job_queue_status's summaries)."""
    status = get_job_queue_status()
    late = Counter((row.pool, row.queue) for row in status.pending if row.state == "Late")
    return [QueueReading(pool=q.pool, queue=q.queue, pending=q.pending, late=late[q.pool, q.queue], running=q.running,
                         oldest_wait_s=q.oldest_wait_s, queued_cost_usd=q.queued_cost_usd, held_usd=q.held_usd)
            for q in status.queues]


def read_online_workers() -> dict[str, int]:
    """Workers Prefect counts ONLINE (heartbeating) per pool, as `oppen health` counts them."""
    with context.prefect() as client:
        return {pool.name: sum(1 for worker in client.read_workers_for_work_pool(pool.name)
                               if worker.status == WorkerStatus.ONLINE)
                for pool in client.read_work_pools()}


def read_budgets() -> list[BudgetStatus]:
    """Every team's budgets as `oppen quota TEAM` shows them: amount, spent (this month when monthly), held."""
    with context.ledger() as ledger:
        now = utcnow()
        return [status for team in ledger.team_names() for status in budget_statuses(ledger, team, now)]


FinishedKey = tuple[str, str, str]  # (deployment as flow/deployment, state type, state name)


def read_finished_runs() -> dict[FinishedKey, int]:
    """Flow runs of each deployment in each final state, as Prefect's server counts them (one query a deployment)."""
    with context.prefect() as client:
        counts: dict[FinishedKey, int] = {}
        for deployment_id, name in deployment_names(client).items():
            for state in _final_states(client, deployment_id):
                key = (name, state["state_type"], state["state_name"])
                counts[key] = counts.get(key, 0) + int(state["count_runs"])
        return counts


def deployment_names(client: SyncPrefectClient) -> dict[UUID, str]:
    """Every deployment's id and its full name, flow/deployment (train-mnist/local), as `prefect deployment run` takes it."""
    deployments, offset = [], 0
    while True:
        page = client.read_deployments(limit=PAGE, offset=offset)
        deployments += page
        if len(page) < PAGE:
            break
        offset += PAGE
    flow_ids = list({deployment.flow_id for deployment in deployments})
    flows = {}
    for start in range(0, len(flow_ids), PAGE):
        chunk = flow_ids[start:start + PAGE]
        flows |= {flow.id: flow.name for flow in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=chunk)),
                                                                  limit=PAGE)}
    return {d.id: f"{flows.get(d.flow_id, d.flow_id)}/{d.name}" for d in deployments}


def _final_states(client: SyncPrefectClient, deployment_id: UUID) -> list[dict]:
    """[{state_type, state_name, count_runs, ...}] of the deployment's runs in a final state, all time."""
    response = client.request("POST", "/flow_runs/history", json={
        "history_start": HISTORY_START.isoformat(),
        "history_end": HISTORY_END.isoformat(),
        "history_interval_seconds": (HISTORY_END - HISTORY_START).total_seconds(),
        "deployments": {"id": {"any_": [str(deployment_id)]}},
        "flow_runs": {"state": {"type": {"any_": [state.value for state in FINAL_STATES]}}},
    })
    return [state for interval in response.json() for state in interval["states"]]
