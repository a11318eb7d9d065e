"""Bring a v1 ledger (floats, one row per run) into schema v2 (micro-dollars, attempts, charges), once.

v1 kept money as floats in `oppen_budgets` and `oppen_reservations`. Those tables are left as
they were (a record of what was there); their contents are copied into the v2 tables, each
amount rounded half-up to the micro-dollar, each v1 row becoming one run with one attempt whose
spend is one charge in the row's month. The copy and the schema-version mark are one
transaction, taken under a lock, so concurrent processes migrate exactly once.
"""

from __future__ import annotations

import uuid

from sqlalchemy import MetaData, Table, inspect, insert, select
from sqlalchemy.engine import Connection, Engine

from oppen.cost.ledger_schema import SCHEMA_VERSION, attempts, charges, ledger_meta, runs, team_budgets
from oppen.cost.money import to_micros

V1_STATUSES = {"reserved": "running", "settled": "settled", "stopped": "stopped", "failed": "failed",
               "preempted": "preempted", "expired": "expired", "refused": "refused"}


def migrate_v1(engine: Engine) -> bool:
    """Copy a v1 ledger's budgets and reservations into v2 tables; True when this call migrated."""
    with engine.connect().execution_options(oppen_ledger_write=True) as c, c.begin():
        if engine.dialect.name == "postgresql":
            c.exec_driver_sql("SELECT pg_advisory_xact_lock(80770001)")  # one migrator at a time
        if c.execute(select(ledger_meta.c.value).where(ledger_meta.c.key == "schema_version")).first():
            return False
        names = set(inspect(c).get_table_names())
        migrated = {"oppen_budgets", "oppen_reservations"} <= names
        if migrated:
            _copy(c)
        c.execute(insert(ledger_meta).values(key="schema_version", value=SCHEMA_VERSION))
        if migrated:
            c.execute(insert(ledger_meta).values(key="migrated_from", value="1"))
        return migrated


def _copy(c: Connection) -> None:
    old = MetaData()
    v1_budgets = Table("oppen_budgets", old, autoload_with=c)
    v1_reservations = Table("oppen_reservations", old, autoload_with=c)
    for row in c.execute(select(v1_budgets)):
        c.execute(insert(team_budgets).values(team=row.team, experiment=row.experiment,
                                              amount_micros=to_micros(row.amount_usd), period=row.period,
                                              updated_at=row.updated_at))
    for row in c.execute(select(v1_reservations)):
        status = V1_STATUSES.get(row.status, row.status)
        spent = to_micros(row.actual_usd or 0.0)
        held = to_micros(row.reserved_usd or 0.0) if status == "running" else 0
        c.execute(insert(runs).values(
            id=row.id, run_key=row.run_key, team=row.team, experiment=row.experiment, workload=row.workload or "",
            month=row.month, cap_micros=None, quote_micros=to_micros(row.quote_usd or 0.0), spent_micros=spent,
            status="reserved" if status == "running" else status, reason=row.reason,
            mlflow_run_id=row.mlflow_run_id, created_at=row.created_at, settled_at=row.settled_at, detail=row.detail,
        ))
        attempt_id = f"v1-{uuid.uuid5(uuid.NAMESPACE_URL, row.id)}"
        c.execute(insert(attempts).values(
            id=attempt_id, run_id=row.id, number=1, status=status, held_micros=held,
            cost_micros=spent if status not in ("running", "refused") else None, month=row.month,
            started_at=row.created_at, expires_at=row.expires_at, settled_at=row.settled_at, reason=row.reason,
        ))
        if spent:
            c.execute(insert(charges).values(attempt_id=attempt_id, month=row.month, amount_micros=spent,
                                             kind="expiry" if status == "expired" else "usage",
                                             booked_at=row.settled_at or row.created_at))
