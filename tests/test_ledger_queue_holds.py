"""Holds of queued runs on SQLite and PostgreSQL: they count against budgets, pass to the run once, never charge."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone


from oppen.cost.money import to_micros
from tests.test_ledger import _ledger, _reserve, _settle, ledger_url  # noqa: F401  (the fixture, both backends)


def _queue(ledger, key: str, usd: float, experiment: str = "mnist", **kw):
    return ledger.hold_queued(team="ml", experiment=experiment, run_key=key, hold_micros=to_micros(usd),
                              quote_micros=to_micros(usd), expected_seconds=60, hold_for=timedelta(hours=1),
                              workload="mnist", queue="normal", **kw)


def test_a_queue_cannot_promise_more_than_the_budget(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    first, second = _queue(ledger, "q-1", 0.6), _queue(ledger, "q-2", 0.6)
    assert first.accepted and first.held_micros == 600_000
    assert not second.accepted and second.held_micros == 0 and "over budget" in second.reason
    assert ledger.usage("ml") == (0, 600_000)
    assert _queue(ledger, "q-1", 0.9) == first  # holding again answers the same
    assert not _reserve(ledger, "direct", 0.5).accepted  # the queued hold counts for runs started directly
    ledger.dispose()


def test_the_run_takes_its_queue_hold_over_once(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    _queue(ledger, "q-1", 0.6)
    started = _reserve(ledger, "q-1", 0.7)  # its own hold replaces the queue's: 0.7 fits, 0.6 + 0.7 would not
    assert started.accepted and started.held_micros == 700_000
    assert ledger.queue_hold("q-1").status == "started" and ledger.queue_hold("q-1").held_micros == 600_000
    assert ledger.usage("ml") == (0, 700_000)
    _settle(ledger, started.attempt_id, 0.25)
    assert ledger.usage("ml") == (250_000, 0)  # charged what it spent, nothing for having waited
    assert ledger.release_queued("q-1", "too late").status == "started"  # a started run's hold is not cancelled
    ledger.dispose()


def test_cancel_releases_and_lapse_charges_nothing(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    _queue(ledger, "q-1", 0.4)
    released = ledger.release_queued("q-1", "cancelled by alice: wrong learning rate")
    assert released.status == "cancelled" and released.held_micros == 0 and "alice" in released.reason
    assert ledger.usage("ml") == (0, 0) and ledger.release_queued("unknown", "x") is None
    later = datetime.now(timezone.utc) + timedelta(hours=2)
    _queue(ledger, "q-2", 0.4)
    assert _reserve(ledger, "other", 0.9, now=later).accepted  # q-2's hold lapsed: nothing ran, nothing owed
    assert ledger.queue_hold("q-2").status == "expired" and ledger.usage("ml")[0] == 0
    ledger.dispose()


def test_a_refused_run_releases_its_queue_hold(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    _queue(ledger, "q-1", 0.4)
    ledger.refuse(team="ml", experiment="mnist", run_key="q-1", attempt_id="q-1#1", reason="over budget")
    hold = ledger.queue_hold("q-1")
    assert hold.status == "started" and "refused" in hold.reason and ledger.usage("ml") == (0, 0)
    ledger.dispose()


def test_a_run_that_reserved_first_is_not_held_again(ledger_url):
    ledger = _ledger(ledger_url, amount=1.0)
    _reserve(ledger, "q-1", 0.6)
    late = _queue(ledger, "q-1", 0.6)
    assert late.status == "started" and late.held_micros == 0 and ledger.usage("ml") == (0, 600_000)
    ledger.dispose()
