"""The ledger's tables (schema v2): money in integer micro-dollars, one row per run, attempt and charge.

    oppen_teams          a team (unchanged since v1)
    oppen_team_budgets   a team-wide ("" experiment) or per-experiment budget, total or monthly
    oppen_runs           one row per training run (its flow run id): who pays, its cap, its quote
    oppen_attempts       one row per attempt of a run (a rescheduled run has several): its hold, its cost
    oppen_charges        what an attempt cost, booked to the calendar month (UTC) it ran in
    oppen_queue_holds    what a queued run (created, not started) holds against its budgets

A run's spend is the sum of its attempts' charges; a budget's use is the sum of the charges in
its scope (and month) plus the holds of attempts still running and of runs still queued. Every figure is an integer
sum, exact on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

SCHEMA_VERSION = "2"
NAME_LENGTH = 63  # teams: DNS-label-like names
EXPERIMENT_LENGTH = 255  # the limit the flows' `experiment` parameter enforces

metadata = MetaData()

teams = Table(
    "oppen_teams",
    metadata,
    Column("name", String(NAME_LENGTH), primary_key=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

ledger_meta = Table(
    "oppen_ledger_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

team_budgets = Table(
    "oppen_team_budgets",
    metadata,
    Column("team", String(NAME_LENGTH), ForeignKey("oppen_teams.name"), nullable=False),
    Column("experiment", String(EXPERIMENT_LENGTH), nullable=False, default=""),  # "" is the team-wide budget
    Column("amount_micros", BigInteger, nullable=False),
    Column("period", String(16), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("team", "experiment", name="oppen_team_budgets_scope"),
)

runs = Table(
    "oppen_runs",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("run_key", String(255), nullable=False, unique=True),  # the flow run id: a rescheduled run finds its row
    Column("team", String(NAME_LENGTH), ForeignKey("oppen_teams.name"), nullable=False, index=True),
    Column("experiment", String(EXPERIMENT_LENGTH), nullable=False, index=True),
    Column("workload", String(63), nullable=False, default=""),
    Column("month", String(7), nullable=False, index=True),  # YYYY-MM (UTC) the run was first reserved in
    Column("cap_micros", BigInteger, nullable=True),  # the run's max_cost_usd over all its attempts
    Column("quote_micros", BigInteger, nullable=False),  # the latest attempt's expected cost
    Column("spent_micros", BigInteger, nullable=False, default=0),  # = SUM(charges), rewritten in the same transaction
    Column("status", String(16), nullable=False, index=True),
    Column("reason", Text, nullable=True),
    Column("mlflow_run_id", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True), nullable=True),
    Column("detail", Text, nullable=True),  # JSON: the last settlement's hours and metric, budgets at reserve time
)

attempts = Table(
    "oppen_attempts",
    metadata,
    Column("id", String(64), primary_key=True),  # chosen by the attempt itself: a retried settle names it again
    Column("run_id", String(36), ForeignKey("oppen_runs.id"), nullable=False, index=True),
    Column("number", Integer, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("held_micros", BigInteger, nullable=False),  # counts against budgets while status is "running"
    Column("cost_micros", BigInteger, nullable=True),  # what it cost (the hold, if it expired unsettled)
    Column("month", String(7), nullable=False),  # YYYY-MM (UTC) it was reserved in
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("settled_at", DateTime(timezone=True), nullable=True),
    Column("reason", Text, nullable=True),
    Column("detail", Text, nullable=True),
    UniqueConstraint("run_id", "number", name="oppen_attempts_number"),
)

charges = Table(
    "oppen_charges",
    metadata,
    Column("attempt_id", String(64), ForeignKey("oppen_attempts.id"), nullable=False),
    Column("month", String(7), nullable=False, index=True),
    Column("amount_micros", BigInteger, nullable=False),
    Column("kind", String(8), nullable=False),  # "usage" (metered) or "expiry" (the hold of an attempt that never settled)
    Column("booked_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("attempt_id", "month", name="oppen_charges_pk"),
)

queue_holds = Table(
    "oppen_queue_holds",
    metadata,
    # A queued run holds its quote from the moment it is queued, so a queue cannot promise more than
    # its budgets have; its first attempt's reservation takes the hold over (never charged itself).
    Column("run_key", String(255), primary_key=True),  # the flow run id
    Column("team", String(NAME_LENGTH), ForeignKey("oppen_teams.name"), nullable=False, index=True),
    Column("experiment", String(EXPERIMENT_LENGTH), nullable=False),
    Column("workload", String(63), nullable=False, default=""),
    Column("queue", String(63), nullable=False, default=""),
    Column("held_micros", BigInteger, nullable=False),  # counts against budgets while status is "held"
    Column("quote_micros", BigInteger, nullable=True),  # expected cost; None: no history to quote from
    Column("expected_seconds", BigInteger, nullable=True),  # for queue ETAs
    Column("status", String(16), nullable=False, index=True),  # held | started | cancelled | expired
    Column("reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("closed_at", DateTime(timezone=True), nullable=True),
)
