"""The budget ledger on SQLite and PostgreSQL: budgets, atomic reservations, settlement, concurrency."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import create_engine, text

from oppen.cost.budgets import BudgetsFile, apply_budgets, load_budgets, open_ledger
from oppen.cost.ledger import Ledger, LedgerError, UnknownTeamError

PG_ENV = "OPPEN_TEST_POSTGRES_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} is not set: the PostgreSQL ledger tests need a server (.ci/run sets it)")
    schema = f"oppen_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def _ledger(url: str, amount: float = 1.0, period: str = "total", experiment_amount: float | None = None) -> Ledger:
    ledger = Ledger(url)
    ledger.create_schema()
    teams = {"ml": {"budget": {"amount_usd": amount, "period": period}}}
    if experiment_amount:
        teams["ml"]["experiments"] = {"mnist": {"amount_usd": experiment_amount, "period": period}}
    apply_budgets(ledger, BudgetsFile.model_validate({"teams": teams}))
    return ledger


def _reserve(ledger: Ledger, key: str, usd: float, experiment: str = "mnist", **kw):
    return ledger.reserve(team="ml", experiment=experiment, run_key=key, quote_usd=usd, reserve_usd=usd,
                          hold_for=timedelta(hours=1), **kw)


def test_reserve_settle_and_refuse(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    first = _reserve(ledger, "run-1", 0.6)
    assert first.accepted and first.reserved_usd == 0.6 and first.headroom_usd == pytest.approx(1.0)
    refused = _reserve(ledger, "run-2", 0.5)  # 0.6 held + 0.5 > 1.0
    assert not refused.accepted and "over budget" in refused.reason and "team ml" in refused.reason
    ledger.settle(first.id, actual_usd=0.3)  # releases the hold, charges what was spent
    assert ledger.used_usd("ml") == pytest.approx(0.3)
    second = _reserve(ledger, "run-2", 0.5)  # a retry of a refused run is decided afresh
    assert second.accepted
    statuses = {row["run_key"]: row["status"] for row in ledger.rows(team="ml")}
    assert statuses == {"run-1": "settled", "run-2": "reserved"}
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


def test_monthly_budgets_reset_each_calendar_month(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0, period="monthly")
    october = datetime(2026, 10, 31, 23, 0, tzinfo=timezone.utc)
    held = _reserve(ledger, "oct", 0.9, now=october)
    ledger.settle(held.id, actual_usd=0.9, now=october)
    assert not _reserve(ledger, "oct-2", 0.2, now=october + timedelta(minutes=10)).accepted
    assert _reserve(ledger, "nov", 0.9, now=datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc)).accepted
    ledger.dispose()


def test_rescheduled_run_gets_its_reservation_back_and_adds_its_spend(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    first = _reserve(ledger, "flow-run-1", 0.5)
    again = _reserve(ledger, "flow-run-1", 0.5)
    assert again.reused and again.id == first.id and again.accepted
    ledger.settle(first.id, actual_usd=0.2, status="failed", reason="SIGTERM (preempted)")
    resumed = _reserve(ledger, "flow-run-1", 0.5)
    assert resumed.reused and resumed.accepted
    ledger.settle(resumed.id, actual_usd=0.25)
    assert ledger.get(first.id)["actual_usd"] == pytest.approx(0.45)
    ledger.dispose()


def test_stale_reservation_of_a_crashed_run_expires(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    start = datetime(2026, 11, 1, 12, tzinfo=timezone.utc)
    crashed = ledger.reserve(team="ml", experiment="x", run_key="crashed", quote_usd=0.4, reserve_usd=0.4,
                             hold_for=timedelta(minutes=30), now=start)
    later = _reserve(ledger, "later", 0.5, now=start + timedelta(hours=1))
    assert later.accepted
    row = ledger.get(crashed.id)
    assert row["status"] == "expired" and row["actual_usd"] == pytest.approx(0.4)
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
    held = ledger.used_usd("ml")
    assert sum(outcomes) == 8
    assert held == pytest.approx(0.96) and held <= 1.0
    assert sum(row["status"] == "refused" for row in ledger.rows(team="ml")) == 12
    ledger.dispose()


def test_unknown_team_and_bad_amounts_are_rejected(ledger_url):
    ledger = _ledger(ledger_url)
    with pytest.raises(UnknownTeamError, match="unknown team 'nobody'.*known: ml"):
        ledger.reserve(team="nobody", experiment="x", run_key="k", quote_usd=0.1, reserve_usd=0.1,
                       hold_for=timedelta(hours=1))
    with pytest.raises(LedgerError, match="must be positive"):
        ledger.set_budget("ml", -5.0, "total")
    with pytest.raises(LedgerError, match="cannot reserve"):
        _reserve(ledger, "nan", float("nan"))
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
