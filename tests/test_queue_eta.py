"""Queue ETAs: priority order, slots freed by running runs, scheduled times, and runs with no quote."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from oppen.api.queue_eta import Pending, Running, estimate

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def _at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_priority_then_scheduled_time_on_one_slot():
    pending = [Pending("bg", 3, _at(-60), 100), Pending("n2", 2, _at(-10), 50), Pending("n1", 2, _at(-30), 20),
               Pending("u", 1, _at(0), 10)]
    etas = estimate(pending, [Running("r", _at(-40), 100)], slots=1, now=NOW)
    assert [(e.id, e.position) for e in etas] == [("u", 1), ("n1", 2), ("n2", 3), ("bg", 4)]
    assert [e.start for e in etas] == [_at(60), _at(70), _at(90), _at(140)]  # r ends at +60
    assert all(e.exact for e in etas)


def test_two_slots_and_a_future_start():
    pending = [Pending("a", 2, _at(-5), 30), Pending("b", 2, _at(-4), 30), Pending("later", 2, _at(600), 30)]
    etas = {e.id: e.start for e in estimate(pending, [], slots=2, now=NOW)}
    assert etas == {"a": NOW, "b": NOW, "later": _at(600)}


def test_a_lowered_limit_waits_for_enough_runs_to_end():
    running = [Running("r1", NOW, 10), Running("r2", NOW, 20), Running("r3", NOW, 30)]
    (eta,) = estimate([Pending("p", 2, NOW, 5)], running, slots=2, now=NOW)
    assert eta.start == _at(20)  # 3 running, 2 slots: the first start needs two of them to end


def test_unquoted_runs_make_later_etas_lower_bounds():
    etas = estimate([Pending("x", 2, NOW, None), Pending("y", 2, _at(1), 10)], [], slots=1, now=NOW)
    assert etas[0].exact and not etas[1].exact and etas[1].start == _at(1)


def test_no_limit_and_a_closed_pool():
    pending = [Pending("a", 2, _at(-5), 30)]
    assert estimate(pending, [], slots=None, now=NOW)[0].start == NOW
    assert estimate(pending, [], slots=0, now=NOW)[0].start is None
