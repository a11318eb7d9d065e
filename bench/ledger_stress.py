"""Ledger under load: 20 processes spend one $1.00 budget at once, on SQLite and PostgreSQL side by side.

    .venv/bin/python -m bench.ledger_stress                    # PostgreSQL from $OPPEN_TEST_POSTGRES_URL
    .venv/bin/python -m bench.ledger_stress --postgres-url postgresql+psycopg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/ledger_stress.py --processes 3 --runs 1     (a smoke run: SQLite only, seconds)

Each process runs a few fake training runs, each a real RunBudget with a real CostMeter (~10 ms
steps), while the harness sends SIGTERMs (preemptions, then a successor process resumes the run),
SIGKILLs a few (their holds expire and are charged), settles attempts a second time, and lets
publishing to MLflow fail (tests/ledger_stress_worker.py). It measures the throughput and the
latency of the ledger under that contention, and checks it to the micro-dollar against what the
processes recorded: overspend (spent + held above the budget, at any sample) and double counts
(attempts charged more than they cost) must both be 0. Times exclude the processes' start-up.
Without a PostgreSQL URL only SQLite is measured. Needs no dataset.
"""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file (python bench/x.py): the repository root in bench/'s place, see bench/__init__.py
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(_here)] + [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from bench.common import positive_int, table  # noqa: E402
from oppen.cost.money import format_usd  # noqa: E402
from tests.ledger_stress_worker import StressConfig, StressResult, run_stress  # noqa: E402
from tests.postgres import postgres_schema  # noqa: E402

PG_ENV = "OPPEN_TEST_POSTGRES_URL"


def row(result: StressResult) -> list[str]:
    return [
        result.backend, str(result.processes), str(result.runs), str(result.attempts),
        f"{result.reservations / result.wall_s:.1f}", f"{result.settles / result.wall_s:.1f}",
        f"{1000 * statistics.median(result.reserve_latency_s):.0f}", f"{1000 * result.percentile(0.95):.0f}",
        format_usd(result.overspend_micros), str(result.double_counts), str(result.preemptions), str(result.expired),
        str(result.refused), format_usd(result.spent_micros), f"{result.wall_s:.1f}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres-url", default=os.environ.get(PG_ENV), help=f"default: ${PG_ENV}")
    parser.add_argument("--processes", type=positive_int, default=StressConfig.processes, help="at once")
    parser.add_argument("--runs", type=positive_int, default=StressConfig.runs_per_process, help="runs per process")
    parser.add_argument("--seed", type=int, default=StressConfig.seed)
    args = parser.parse_args(argv)
    if args.processes < StressConfig.kills:
        parser.error(f"--processes must be at least {StressConfig.kills}: the harness SIGKILLs that many of them")
    config = StressConfig(processes=args.processes, runs_per_process=args.runs, seed=args.seed)
    results, notes = [], []
    with tempfile.TemporaryDirectory(prefix="ledger-stress-") as tmp:
        work = Path(tmp)
        print("sqlite ...", flush=True)
        results.append(run_stress(f"sqlite:///{work / 'sqlite.db'}", work / "sqlite", config))
        if args.postgres_url:
            print("postgresql ...", flush=True)
            with postgres_schema(args.postgres_url) as url:
                results.append(run_stress(url, work / "postgresql", config))
        else:
            notes.append(f"postgresql: skipped (set ${PG_ENV} or pass --postgres-url)")
    print()
    print(table(["backend", "processes", "runs", "attempts", "reservations/s", "settles/s", "reserve p50 ms",
                 "reserve p95 ms", "overspend", "double counts", "preemptions", "expired", "refused", "spent",
                 "wall s"], [row(result) for result in results]))
    print(f"\n{config.processes} at once, {config.runs_per_process} runs each, budget ${config.budget_usd:.2f}; "
          "processes counts the successors of preempted and killed ones; reservations include refusals")
    for note in notes:
        print(note)
    problems = [f"{result.backend}: {problem}" for result in results for problem in result.problems]
    for problem in problems:
        print(f"PROBLEM {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
