"""`oppen`: the command line for budgets and the ledger (flows run through `prefect deployment run`).

    oppen budgets apply [--file budgets.yaml]   create/update teams and budgets (idempotent)
    oppen budgets list                          budgets with what is used this month
    oppen ledger [--team T] [--experiment E]    the reservations, newest last
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from oppen.cost.budgets import apply_budgets, load_budgets, open_ledger
from oppen.cost.ledger import month_of, utcnow
from oppen.settings import load_settings


def _budgets_apply(args: argparse.Namespace) -> int:
    settings = load_settings()
    spec = load_budgets(args.file or settings.budgets_file)
    ledger = open_ledger(settings.ledger, args.file or settings.budgets_file)
    try:
        changes = apply_budgets(ledger, spec)
    finally:
        ledger.dispose()
    print("\n".join(changes) if changes else "no changes")
    return 0


def _budgets_list(args: argparse.Namespace) -> int:
    settings = load_settings()
    ledger = open_ledger(settings.ledger, settings.budgets_file)
    month = month_of(utcnow())
    try:
        print(f"{'team':<16} {'experiment':<24} {'period':<8} {'budget $':>12} {'used $':>12} {'used':>6}")
        for team in ledger.team_names():
            for budget in ledger.budgets_of(team):
                used = ledger.used_usd(team, budget["experiment"] or None,
                                       month if budget["period"] == "monthly" else None)
                share = used / budget["amount_usd"]
                print(f"{team:<16} {budget['experiment'] or '*':<24} {budget['period']:<8} "
                      f"{budget['amount_usd']:>12.4f} {used:>12.6f} {share:>6.1%}")
    finally:
        ledger.dispose()
    return 0


def _ledger(args: argparse.Namespace) -> int:
    settings = load_settings()
    ledger = open_ledger(settings.ledger, settings.budgets_file)
    try:
        for row in ledger.rows(team=args.team, experiment=args.experiment):
            spent = f"{row['actual_usd']:.6f}" if row["actual_usd"] is not None else "-"
            print(f"{row['created_at']:%Y-%m-%d %H:%M} {row['team']:<12} {row['experiment']:<20} {row['status']:<9} "
                  f"quote {row['quote_usd']:.6f} held {row['reserved_usd']:.6f} spent {spent} {row['run_key']}")
    finally:
        ledger.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oppen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    budgets = commands.add_parser("budgets", help="teams and budgets").add_subparsers(dest="action", required=True)
    apply = budgets.add_parser("apply", help="apply a budgets file to the ledger")
    apply.add_argument("--file", type=Path, help="budgets YAML (default: $OPPEN_BUDGETS_FILE or the shipped file)")
    apply.set_defaults(handler=_budgets_apply)
    budgets.add_parser("list", help="budgets and what is used").set_defaults(handler=_budgets_list)
    rows = commands.add_parser("ledger", help="reservations and settled costs")
    rows.add_argument("--team")
    rows.add_argument("--experiment")
    rows.set_defaults(handler=_ledger)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, ValidationError) as error:  # bad files or names: a clear message, not a traceback
        print(f"oppen: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
