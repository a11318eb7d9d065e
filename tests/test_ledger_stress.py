"""20 OS processes spend one $1.00 budget at once, with SIGTERMs, SIGKILLs, repeated settles and MLflow down.

The children record what they really metered, attempt by attempt; the ledger must agree with
them to the micro-dollar and never have held more than the budget (tests/ledger_stress_worker.py
describes the harness; bench/ledger_stress.py prints its figures).
"""

from __future__ import annotations


import pytest

from tests.ledger_stress_worker import StressConfig, run_stress
from tests.postgres import postgres_base, postgres_schema

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgresql"])
def stress_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with postgres_schema(postgres_base("the PostgreSQL stress test"), prefix="oppen_stress") as url:
        yield url


def test_many_processes_spend_one_budget_exactly_through_every_fault(stress_url, tmp_path):
    result = run_stress(stress_url, tmp_path / "stress", StressConfig())
    print(f"\n{result.backend}: {result.processes} processes, {result.attempts} attempts, {result.refused} refusals, "
          f"{result.preemptions} preempted, {result.kills} killed, {result.wall_s:.1f} s")
    assert result.problems == []
    # The ledger's spend is what the children metered (plus the holds of the killed), to the micro-dollar.
    assert result.spent_micros == result.recorded_micros > 0
    assert result.mismatches == result.run_mismatches == result.double_counts == 0
    # Never more than the budget: not at the end, not in any sample taken while the children ran.
    assert result.overspend_micros == 0 and result.peak_used_micros <= result.budget_micros
    assert result.samples >= 10 and result.over_hold_micros == 0
    # The faults happened: otherwise the checks above prove less than they claim.
    assert result.preemptions >= 1 and result.processes > StressConfig().processes  # successors were started
    assert result.kills >= 1 and result.expired == result.kills
    assert result.replays >= 1 and result.publish_failures >= 1
    assert result.refused >= 1  # the budget ran out, so the last runs were refused
