"""Book what the settlement journal holds and the ledger lacks; charge holds past their expiry.

Run by `oppen reconcile` (by hand, or on a schedule) after a ledger outage. Booking is
idempotent per attempt, so an entry that did reach the ledger before its file could be removed
is recognised and only its file goes. An entry the ledger refuses (it names an attempt the
ledger never saw, say) is kept and reported, never guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from oppen.cost.journal import SettlementJournal
from oppen.cost.ledger import Ledger, LedgerError
from oppen.cost.money import Micros


@dataclass(frozen=True)
class Reconciled:
    attempt_id: str
    run_key: str
    outcome: str  # booked | already booked | replaced expiry | expired | unreadable | refused
    cost_micros: Micros | None
    detail: str = ""


def reconcile(ledger: Ledger, journal: SettlementJournal, *, expire: bool = True,
              now: datetime | None = None) -> list[Reconciled]:
    results = []
    for path, entry in journal.pending():
        if entry is None:
            results.append(Reconciled(path.stem, "?", "unreadable", None, f"{path} is not a settlement entry"))
            continue
        try:
            booked = ledger.settle(entry.attempt_id, charges_by_month=entry.charges_by_month, status=entry.status,
                                   reason=entry.reason, mlflow_run_id=entry.mlflow_run_id, detail=entry.detail, now=now)
        except LedgerError as error:
            results.append(Reconciled(entry.attempt_id, entry.run_key, "refused", entry.cost_micros, str(error)))
            continue
        journal.done(entry.attempt_id)
        outcome = ("already booked" if booked.replayed
                   else "replaced expiry" if booked.replaced_expiry_micros is not None else "booked")
        results.append(Reconciled(entry.attempt_id, entry.run_key, outcome, booked.cost_micros))
    if expire:
        for attempt_id in ledger.expire_stale(now):
            held = ledger.attempt(attempt_id) or {}
            results.append(Reconciled(attempt_id, "", "expired", held.get("cost_micros"), "charged its hold"))
    return results
