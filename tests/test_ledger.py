"""The budget ledger on SQLite and PostgreSQL: exact budgets, atomic holds and top-ups, settlement once per attempt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from decimal import Decimal
from sqlalchemy import create_engine, text

from oppen.cost.budgets import BudgetsFile, apply_budgets, load_budgets, open_ledger
from oppen.cost.ledger import Ledger, LedgerError, UnknownTeamError
from oppen.cost.money import to_micros
from tests.postgres import postgres_base, postgres_schema

@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    with postgres_schema(postgres_base("the PostgreSQL ledger tests")) as url:
        yield url


def _ledger(url: str, amount: float = 1.0, period: str = "total", experiment_amount: float | None = None) -> Ledger:
    ledger = Ledger(url)
    ledger.create_schema()
    teams = {"ml": {"budget": {"amount_usd": amount, "period": period}}}
    if experiment_amount:
        teams["ml"]["experiments"] = {"mnist": {"amount_usd": experiment_amount, "period": period}}
    apply_budgets(ledger, BudgetsFile.model_validate({"teams": teams}))
    return ledger


def _reserve(ledger: Ledger, key: str, usd: float, experiment: str = "mnist", attempt: str | None = None, **kw):
    micros = to_micros(usd)
    return ledger.reserve(team="ml", experiment=experiment, run_key=key, attempt_id=attempt or f"{key}#1",
                          quote_micros=micros, hold_micros=micros, hold_for=timedelta(hours=1), **kw)


def _settle(ledger: Ledger, attempt_id: str, usd: float, status: str = "settled", month: str = "2026-11", **kw):
    return ledger.settle(attempt_id, charges_by_month={month: to_micros(usd)}, status=status, **kw)


def test_reserve_settle_and_refuse(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    first = _reserve(ledger, "run-1", 0.6)
    assert first.accepted and first.held_micros == 600_000 and first.attempt_number == 1 and not first.reused
    refused = _reserve(ledger, "run-2", 0.5)  # 0.6 held + 0.5 > 1.0
    assert not refused.accepted and "over budget" in refused.reason and "team ml" in refused.reason
    settled = _settle(ledger, first.attempt_id, 0.3)  # releases the hold, charges what was spent
    assert settled.cost_micros == settled.run_spent_micros == 300_000 and not settled.replayed
    assert ledger.usage("ml") == (300_000, 0)
    second = _reserve(ledger, "run-2", 0.5, attempt="run-2#2")  # a retry of a refused run is decided afresh
    assert second.accepted and second.attempt_number == 2
    statuses = {row["run_key"]: row["status"] for row in ledger.rows(team="ml")}
    assert statuses == {"run-1": "settled", "run-2": "reserved"}
    ledger.dispose()


def test_money_is_exact_integer_micro_dollars(ledger_url):
    """A tenth of a cent, a thousand times: floats drift, integers do not."""
    ledger = _ledger(ledger_url, amount=10.0)
    for index in range(50):
        held = _reserve(ledger, f"r{index}", 0.001)
        _settle(ledger, held.attempt_id, 0.0001 * 3)  # 0.0003 is not exact in binary floating point
    spent, held = ledger.usage("ml")
    assert spent == 50 * 300 and held == 0
    assert sum(row["actual_usd"] for row in ledger.rows(team="ml")) == Decimal("0.015")
    ledger.dispose()


def test_settling_twice_or_retrying_a_settle_charges_once(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    held = _reserve(ledger, "run", 0.5)
    first = _settle(ledger, held.attempt_id, 0.2)
    again = _settle(ledger, held.attempt_id, 0.2)
    different = _settle(ledger, held.attempt_id, 0.4, status="preempted")  # a SIGTERM's late second settle
    assert (again.replayed, different.replayed) == (True, True)
    assert again.cost_micros == different.cost_micros == first.cost_micros == 200_000
    assert ledger.usage("ml") == (200_000, 0)
    assert _reserve(ledger, "run", 0.5) == _reserve(ledger, "run", 0.5)  # a retried reserve is the same attempt
    ledger.dispose()


def test_experiment_budget_is_checked_besides_the_team_budget(ledger_url):
    ledger = _ledger(ledger_url, amount=10.0, experiment_amount=0.5)
    assert _reserve(ledger, "a", 0.4).accepted
    refused = _reserve(ledger, "b", 0.2)
    assert not refused.accepted and "experiment ml/mnist" in refused.reason
    assert _reserve(ledger, "c", 0.2, experiment="other").accepted  # only the team budget applies there
    ledger.dispose()


def test_warning_fraction_is_reported(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    reservation = _reserve(ledger, "a", 0.75)
    assert [use.scope for use in reservation.warnings(0.7)] == ["team ml"]
    ledger.dispose()


def test_each_attempt_is_booked_to_the_month_it_ran_in(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0, period="monthly")
    october = datetime(2026, 10, 31, 23, 0, tzinfo=timezone.utc)
    held = _reserve(ledger, "oct", 0.9, now=october)
    ledger.settle(held.attempt_id, charges_by_month={"2026-10": 600_000, "2026-11": 300_000}, now=october)
    assert not _reserve(ledger, "oct-2", 0.5, now=october + timedelta(minutes=10)).accepted  # 0.6 + 0.5 > 1
    november = datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc)
    assert _reserve(ledger, "nov", 0.7, now=november).accepted  # November already carries 0.3 of the run
    assert not _reserve(ledger, "nov-2", 0.01, now=november).accepted
    assert ledger.usage("ml", month="2026-10")[0] == 600_000
    ledger.dispose()


def test_a_rescheduled_run_reserves_again_within_what_its_cap_has_left(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    cap = to_micros(0.5)
    first = _reserve(ledger, "flow-run-1", 0.4, cap_micros=cap)
    _settle(ledger, first.attempt_id, 0.3, status="preempted")
    resumed = _reserve(ledger, "flow-run-1", 0.4, attempt="flow-run-1#2", cap_micros=cap)
    assert resumed.reused and resumed.accepted and resumed.attempt_number == 2
    assert resumed.prior_micros == 300_000 and resumed.held_micros == 200_000  # min(p90, cap - spent)
    assert resumed.budgets and resumed.budgets[0].used_micros == 300_000  # checked against the budgets again
    _settle(ledger, resumed.attempt_id, 0.2)
    [row] = ledger.rows(team="ml")
    assert (row["spent_micros"], row["attempts"], row["status"]) == (500_000, 2, "settled")
    exhausted = _reserve(ledger, "flow-run-1", 0.4, attempt="flow-run-1#3", cap_micros=cap)
    assert not exhausted.accepted and "already spent by its earlier attempts" in exhausted.reason
    ledger.dispose()


def test_an_attempt_the_cap_cannot_see_through_is_refused_not_started(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    cap = to_micros(0.5)
    first = _reserve(ledger, "run", 0.4, cap_micros=cap)
    _settle(ledger, first.attempt_id, 0.45, status="preempted")
    # 0.05 left; the next attempt has already spent 0.02 loading and needs 0.04 more for its tail.
    second = _reserve(ledger, "run", 0.4, attempt="run#2", cap_micros=cap, min_hold_micros=to_micros(0.06))
    assert not second.accepted and second.held_micros == 0 and "less than this attempt needs" in second.reason
    ledger.dispose()


def test_an_attempt_holds_at_least_what_it_needs_to_end_well_when_its_cap_allows(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    # Its p90 (0.02) is below what it already spent loading plus its tail (0.03): a cap of 0.5 allows the 0.03.
    reservation = _reserve(ledger, "run", 0.02, cap_micros=to_micros(0.5), min_hold_micros=to_micros(0.03))
    assert reservation.accepted and reservation.held_micros == to_micros(0.03)
    uncapped = _reserve(ledger, "other", 0.02, min_hold_micros=to_micros(0.03))
    assert uncapped.accepted and uncapped.held_micros == to_micros(0.03)
    ledger.dispose()


def test_sqlite_reads_neither_wait_for_a_writer_nor_block_it(tmp_path):
    import sqlite3

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = _ledger(url, amount=1.0)
    writer = sqlite3.connect(tmp_path / "ledger.db", timeout=0.1, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process is mid-reservation
    try:
        assert ledger.usage("ml") == (0, 0) and ledger.rows() == []  # WAL: the reader sees the last commit
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    ledger.dispose()


def test_a_reused_reservation_is_checked_against_the_budgets_again(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    first = _reserve(ledger, "long", 0.5)
    _settle(ledger, first.attempt_id, 0.5, status="preempted")
    other = _reserve(ledger, "other", 0.45)
    assert other.accepted
    again = _reserve(ledger, "long", 0.5, attempt="long#2")
    assert not again.accepted and "over budget" in again.reason  # 0.5 spent + 0.45 held + 0.5 > 1.0
    ledger.dispose()


def test_top_up_is_atomic_against_budgets_and_the_run_cap(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    a = _reserve(ledger, "a", 0.3, cap_micros=to_micros(0.6))
    b = _reserve(ledger, "b", 0.3)
    grant = ledger.extend(a.attempt_id, to_micros(0.9))
    assert grant.held_micros == 600_000 and grant.limited_by == "run cap"
    grant = ledger.extend(b.attempt_id, to_micros(0.9))
    assert grant.held_micros == 400_000 and grant.limited_by == "team ml"  # 1.0 - 0.6 held by a
    assert ledger.used_micros("ml") == 1_000_000
    assert ledger.extend(b.attempt_id, to_micros(0.5)).added_micros == 0
    _settle(ledger, a.attempt_id, 0.1)
    assert ledger.extend(b.attempt_id, to_micros(0.5)).held_micros == 500_000
    ledger.dispose()


def test_an_expired_hold_is_charged_and_a_late_settle_replaces_that_charge(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    start = datetime(2026, 11, 1, 12, tzinfo=timezone.utc)
    crashed = ledger.reserve(team="ml", experiment="x", run_key="crashed", attempt_id="c#1", quote_micros=400_000,
                             hold_micros=400_000, hold_for=timedelta(minutes=30), now=start)
    later = _reserve(ledger, "later", 0.5, now=start + timedelta(hours=1))
    assert later.accepted
    assert ledger.attempt(crashed.attempt_id)["status"] == "expired"
    assert ledger.usage("ml")[0] == 400_000  # charged its hold
    late = ledger.settle(crashed.attempt_id, charges_by_month={"2026-11": 120_000})
    assert late.replaced_expiry_micros == 400_000 and late.cost_micros == 120_000 and not late.replayed
    assert ledger.usage("ml")[0] == 120_000  # replaced, not added
    assert ledger.settle(crashed.attempt_id, charges_by_month={"2026-11": 120_000}).replayed
    ledger.dispose()


def test_twenty_concurrent_reservations_never_overspend(ledger_url):
    """20 runs of $0.12 race for $1.00: exactly 8 fit; the ledger must never hold more than the budget."""
    ledger = _ledger(ledger_url, amount=1.0)
    ledger.dispose()

    def attempt(index: int):
        own = Ledger(ledger_url)  # one connection pool per "process", as separate workers would have
        try:
            return _reserve(own, f"run-{index}", 0.12).accepted
        finally:
            own.dispose()

    with ThreadPoolExecutor(max_workers=20) as pool:
        outcomes = list(pool.map(attempt, range(20)))
    ledger = Ledger(ledger_url)
    assert sum(outcomes) == 8
    assert ledger.used_micros("ml") == 960_000
    assert sum(row["status"] == "refused" for row in ledger.rows(team="ml")) == 12
    ledger.dispose()


def test_unknown_team_and_bad_amounts_are_rejected(ledger_url):
    ledger = _ledger(ledger_url)
    with pytest.raises(UnknownTeamError, match="unknown team 'nobody'.*known: ml"):
        ledger.reserve(team="nobody", experiment="x", run_key="k", attempt_id="k#1", quote_micros=1, hold_micros=1,
                       hold_for=timedelta(hours=1))
    with pytest.raises(LedgerError, match="never negative"):
        ledger.set_budget("ml", -5.0, "total")
    with pytest.raises(LedgerError, match="finite"):
        ledger.set_budget("ml", float("inf"), "total")
    with pytest.raises(LedgerError, match="whole micro-dollars"):
        ledger.reserve(team="ml", experiment="x", run_key="k", attempt_id="k#1", quote_micros=1, hold_micros=0.5,
                       hold_for=timedelta(hours=1))
    held = _reserve(ledger, "k", 0.1)
    with pytest.raises(LedgerError, match="YYYY-MM"):
        ledger.settle(held.attempt_id, charges_by_month={"November": 5})
    with pytest.raises(LedgerError, match="no attempt"):
        ledger.settle("nope", charges_by_month={})
    refused = ledger.refuse(team="ml", experiment="x", run_key="r", attempt_id="r#1", reason="budget exhausted")
    with pytest.raises(LedgerError, match="was refused"):
        ledger.settle(refused.attempt_id, charges_by_month={})
    ledger.dispose()


def test_an_absurd_hold_duration_is_clamped_not_an_overflow(ledger_url):
    ledger = _ledger(ledger_url)
    held = ledger.reserve(team="ml", experiment="x", run_key="k", attempt_id="k#1", quote_micros=1, hold_micros=1,
                          hold_for=timedelta(days=999_999))
    assert held.accepted
    ledger.dispose()


def test_a_v1_ledger_is_migrated_once_with_every_amount_exact(tmp_path):
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    engine = create_engine(url)
    with engine.begin() as c:
        c.execute(text("CREATE TABLE oppen_teams (name VARCHAR(63) PRIMARY KEY, created_at DATETIME NOT NULL)"))
        c.execute(text("CREATE TABLE oppen_budgets (team VARCHAR(63), experiment VARCHAR(255), amount_usd FLOAT, "
                       "period VARCHAR(16), updated_at DATETIME)"))
        c.execute(text("CREATE TABLE oppen_reservations (id VARCHAR(36) PRIMARY KEY, run_key VARCHAR(255), team VARCHAR(63), "
                       "experiment VARCHAR(255), workload VARCHAR(63), month VARCHAR(7), quote_usd FLOAT, "
                       "reserved_usd FLOAT, actual_usd FLOAT, status VARCHAR(16), reason TEXT, mlflow_run_id VARCHAR(64), "
                       "created_at DATETIME, expires_at DATETIME, settled_at DATETIME, detail TEXT)"))
        c.execute(text("INSERT INTO oppen_teams VALUES ('ml', '2026-10-01 00:00:00')"))
        c.execute(text("INSERT INTO oppen_budgets VALUES ('ml', '', 1.0, 'total', '2026-10-01 00:00:00')"))
        c.execute(text("INSERT INTO oppen_reservations VALUES ('r1', 'old-run', 'ml', 'mnist', 'mnist', '2026-10', "
                       "0.0003, 0.0, 0.00029149999, 'settled', NULL, 'm1', '2026-10-02 00:00:00', "
                       "'2026-10-02 02:00:00', '2026-10-02 00:01:00', NULL)"))
    engine.dispose()
    for _ in range(2):  # the second open finds the migration done
        ledger = Ledger(url)
        ledger.create_schema()
        [row] = ledger.rows(team="ml")
        assert (row["run_key"], row["spent_micros"], row["status"]) == ("old-run", 291, "settled")
        assert ledger.budgets_of("ml")[0]["amount_micros"] == 1_000_000
        ledger.dispose()


def test_apply_is_idempotent_and_open_ledger_seeds_the_shipped_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'l.db'}"
    ledger = open_ledger(url)
    assert set(ledger.team_names()) == set(load_budgets().teams)
    assert apply_budgets(ledger, load_budgets()) == []  # second apply: nothing changes
    ledger.dispose()


@pytest.mark.parametrize(
    "teams, message",
    [
        ({"ml": {"budget": {"amount_usd": -1}}}, "greater than 0"),
        ({"ml": {"budget": {"amount_usd": 5e9}}}, "less than or equal to 1000000"),
        ({"ML Team": {"budget": {"amount_usd": 1}}}, "must be lowercase"),
        ({"ml": {"budget": {"amount_usd": 1, "period": "weekly"}}}, "'total' or 'monthly'"),
        ({"ml": {"budget": {"amount_usd": 1}, "owner": "x"}}, "Extra inputs are not permitted"),
    ],
)
def test_malformed_budgets_file_is_rejected(teams, message):
    with pytest.raises(ValueError, match=message):
        BudgetsFile.model_validate({"teams": teams})


def test_cli_applies_lists_and_rejects_a_bad_file(tmp_path, monkeypatch, capsys):
    from oppen.cli import main

    monkeypatch.setenv("OPPEN_HOME", str(tmp_path))
    assert main(["budgets", "apply"]) == 0
    assert main(["budgets", "apply"]) == 0
    assert capsys.readouterr().out.strip().endswith("no changes")
    assert main(["budgets", "list"]) == 0
    assert "default" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("teams:\n  ml:\n    budget: {amount_usd: -3}\n")
    assert main(["budgets", "apply", "--file", str(bad)]) == 2
    assert "greater than 0" in capsys.readouterr().err


def test_a_cap_or_a_budget_rounds_down_a_charge_rounds_half_up():
    assert to_micros("0.00014052", ceiling=True) == 140  # never more than its owner set
    assert to_micros("0.00014052") == 141 and to_micros("0.0000005") == 1  # a charge: the nearest micro-dollar
