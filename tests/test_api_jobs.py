"""Queue, trigger and cancel through a real Prefect server: quoted, held, refused over budget, released on cancel."""

from __future__ import annotations

import pytest

from oppen.api import context
from oppen.api.errors import InvalidInput, NotFound, Refused
from oppen.api.jobs import cancel_training_job, queue_training_job, trigger_training
from oppen.api.queue_status import get_job_queue_status

pytestmark = [pytest.mark.slow, pytest.mark.integration]

TINY = {"epochs": 1, "max_steps": 20, "batch_size": 64}




def _flow_run_count() -> int:
    with context.prefect() as client:
        return client.count_flow_runs()


def test_queue_holds_then_cancel_releases(paused_background):
    job = {"workload": "mnist", "run": TINY | {"seed": 11}, "cost": {"max_cost_usd": 0.5}, "name": "api-queued"}
    queued = queue_training_job(job, priority="background")
    assert queued.queue == "background" and queued.state in ("Scheduled", "Late") and queued.position >= 1
    assert 0 < queued.held_micros <= 500_000  # its p90 (history) or its cap (none): never more than the cap
    with context.ledger() as ledger:
        spent_before, held_before = ledger.usage("default", "mnist")
        assert ledger.queue_hold(queued.flow_run_id).status == "held"

    status = get_job_queue_status(pool="local")
    mine = next(row for row in status.pending if row.flow_run_id == queued.flow_run_id)
    assert mine.queue == "background" and mine.held_micros == queued.held_micros and mine.team == "default"
    background = next(q for q in status.queues if q.queue == "background")
    assert background.paused and background.pending >= 1 and background.held_micros >= queued.held_micros
    assert status.total_held_micros >= queued.held_micros

    cancelled = cancel_training_job(queued.flow_run_id, "wrong seed")
    assert cancelled.state == "Cancelled" and cancelled.released_micros == queued.held_micros
    with context.prefect() as client:
        state = client.read_flow_run(context.flow_run_uuid(queued.flow_run_id)).state
    assert state.is_cancelled() and "wrong seed" in state.message
    with context.ledger() as ledger:
        hold = ledger.queue_hold(queued.flow_run_id)
        assert hold.status == "cancelled" and "wrong seed" in hold.reason
        assert ledger.usage("default", "mnist") == (spent_before, held_before - queued.held_micros)
    with pytest.raises(Refused, match="already ended Cancelled"):
        cancel_training_job(queued.flow_run_id, "again")


def test_a_job_over_its_budget_is_refused_before_it_exists(in_process, shoestring_team):
    before = _flow_run_count()
    with pytest.raises(Refused, match="over budget: team shoestring"):
        trigger_training("mnist", run=TINY, cost={"team": shoestring_team, "max_cost_usd": 0.5})
    assert _flow_run_count() == before


def test_mistakes_are_one_sentence(in_process):
    with pytest.raises(InvalidInput, match="epochs"):
        trigger_training("mnist", run={"epochs": 0})
    with pytest.raises(InvalidInput, match="unknown_field"):
        queue_training_job({"workload": "mnist", "unknown_field": 1})
    with pytest.raises(NotFound, match="no deployment train-mnist/nope"):
        trigger_training("mnist", deployment="nope")
    with pytest.raises(NotFound, match="unknown team"):
        trigger_training("mnist", cost={"team": "ghosts"})
    with pytest.raises(InvalidInput, match="not a flow run id"):
        cancel_training_job("not-a-uuid", "x")


def test_trigger_runs_and_its_hold_passes_to_the_run(in_process):
    triggered = trigger_training("mnist", run=TINY | {"seed": 12}, cost={"max_cost_usd": 0.5})
    state = in_process.final_state(triggered.flow_run_id)
    assert state.is_completed(), state.message
    with context.ledger() as ledger:
        hold = ledger.queue_hold(triggered.flow_run_id)
        assert hold.status == "started"  # taken over by the run's reservation: counted once
        (row,) = [r for r in ledger.rows() if r["run_key"] == triggered.flow_run_id]
        assert row["status"] == "settled" and row["spent_micros"] > 0 and row["held_micros"] == 0
        assert not [h for h in ledger.queue_holds() if h.run_key == triggered.flow_run_id]
