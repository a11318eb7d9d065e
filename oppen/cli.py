"""`oppen`: the command line for budgets and the ledger (flows run through `prefect deployment run`).

    oppen budgets apply [--file budgets.yaml]   create/update teams and budgets (idempotent)
    oppen budgets list                          budgets with what is used this month
    oppen ledger [--team T] [--experiment E]    runs with what they held and spent, newest last
    oppen reconcile [--no-expire]               book settlements the ledger missed; charge expired holds
    oppen check                                 prefect.yaml's deployments against the pools file
    oppen submit NAME [-p k=v] [-j k=v] [--queue Q] [--check-cluster]
                                                check pool, queue, job variables (and GPU capacity), then run
    oppen gpus [--spot | --on-demand]           free GPUs per type in the current kube context
    oppen automations apply [--prune] [--file F] [--set k=v]
                                                create/update automations.yaml's automations (idempotent)
    oppen mlflow-webhook serve|register ...     receive MLflow registry webhooks as Prefect events
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from oppen.cost.budgets import apply_budgets, load_budgets, open_ledger
from oppen.cost.ledger import Ledger, month_of, utcnow
from oppen.cost.money import format_usd
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


@contextmanager
def _configured_ledger() -> Iterator[Ledger]:
    settings = load_settings()
    ledger = open_ledger(settings.ledger, settings.budgets_file)
    try:
        yield ledger
    finally:
        ledger.dispose()


def _budgets_list(args: argparse.Namespace) -> int:
    month = month_of(utcnow())
    with _configured_ledger() as ledger:
        print(f"{'team':<16} {'experiment':<24} {'period':<8} {'budget':>14} {'spent':>14} {'held':>12} {'used':>6}")
        for team in ledger.team_names():
            for budget in ledger.budgets_of(team):
                spent, held = ledger.usage(team, budget["experiment"] or None,
                                           month if budget["period"] == "monthly" else None)
                share = (spent + held) / budget["amount_micros"]
                print(f"{team:<16} {budget['experiment'] or '*':<24} {budget['period']:<8} "
                      f"{format_usd(budget['amount_micros']):>14} {format_usd(spent):>14} {format_usd(held):>12} "
                      f"{share:>6.1%}")
    return 0


def _ledger(args: argparse.Namespace) -> int:
    with _configured_ledger() as ledger:
        for row in ledger.rows(team=args.team, experiment=args.experiment):
            print(f"{row['created_at']:%Y-%m-%d %H:%M} {row['team']:<12} {row['experiment']:<20} {row['status']:<9} "
                  f"quote {format_usd(row['quote_micros'])} held {format_usd(row['held_micros'])} "
                  f"spent {format_usd(row['spent_micros'])} in {row['attempts']} attempt(s) {row['run_key']}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from oppen.cost.journal import SettlementJournal
    from oppen.cost.reconcile import reconcile

    journal = SettlementJournal(load_settings().journal_dir())
    with _configured_ledger() as ledger:
        results = reconcile(ledger, journal, expire=not args.no_expire)
    for item in results:
        amount = format_usd(item.cost_micros) if item.cost_micros is not None else "-"
        print(f"{item.outcome:<16} {amount:>12} {item.run_key} {item.attempt_id} {item.detail}".rstrip())
    if not results:
        print(f"nothing to reconcile (journal {journal.directory})")
    return 1 if any(item.outcome in ("refused", "unreadable") for item in results) else 0


def _check(args: argparse.Namespace) -> int:
    from oppen.submit import check_prefect_yaml

    print("\n".join(check_prefect_yaml()))
    return 0


def _pairs(values: list[str] | None) -> dict:
    """k=v pairs; v is JSON when it parses (numbers, booleans, objects), else a string."""
    result = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            result[key] = json.loads(raw)
        except json.JSONDecodeError:
            result[key] = raw
    return result


def _submit(args: argparse.Namespace) -> int:
    from oppen.submit import submit

    flow_run_id, verdict = asyncio.run(submit(args.name, _pairs(args.param), _pairs(args.job_variable), args.queue,
                                              args.check_cluster))
    if verdict is not None:
        print(f"cluster: {verdict.reason}")
    print(f"flow run {flow_run_id}")
    return 0


def _gpus(args: argparse.Namespace) -> int:
    from kubernetes_asyncio import client, config

    from work_pools.gpu_capacity import availability, read_cluster

    async def read():
        await config.load_kube_config()
        async with client.ApiClient() as api:
            return await read_cluster(api)

    nodes, _ = asyncio.run(read())
    print(f"{'gpu type':<28} {'nodes':>5} {'total':>6} {'used':>5} {'free':>5} {'largest free':>12}")
    for row in availability(nodes, spot=args.spot).values():
        print(f"{row.gpu_type:<28} {row.nodes:>5} {row.allocatable:>6} {row.used:>5} {row.free:>5} {row.largest_free:>12}")
    return 0


DELEGATED = {"automations": "automations as code: apply automations.yaml",
             "mlflow-webhook": "serve or register the MLflow registry webhook receiver"}


def _delegate(command: str, rest: list[str]) -> int:
    """Commands whose module owns its arguments (and help): `oppen automations ...` and `oppen mlflow-webhook ...`."""
    if command == "automations":
        from oppen.automations import main as automations_main

        return automations_main(rest)
    from oppen.mlflow_webhook_receiver import main as receiver_main

    return receiver_main(rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
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
    settle = commands.add_parser("reconcile", help="book journalled settlements; charge holds past their expiry")
    settle.add_argument("--no-expire", action="store_true", help="only book the journal; leave expired holds alone")
    settle.set_defaults(handler=_reconcile)
    commands.add_parser("check", help="check prefect.yaml's deployments against the pools file").set_defaults(handler=_check)
    run = commands.add_parser("submit", help="check, then run a deployment")
    run.add_argument("name", help="FLOW/DEPLOYMENT, e.g. train-mnist/gpu")
    run.add_argument("-p", "--param", action="append", help="flow parameter k=v (v as JSON when it parses)")
    run.add_argument("-j", "--job-variable", action="append", help="job variable k=v (v as JSON when it parses)")
    run.add_argument("--queue", help="work queue (default: the deployment's)")
    run.add_argument("--check-cluster", action="store_true",
                     help="Kubernetes pool: refuse a request no node or team quota can take (reads the kube context)")
    run.set_defaults(handler=_submit)
    gpus = commands.add_parser("gpus", help="free GPUs per type in the current kube context")
    capacity = gpus.add_mutually_exclusive_group()
    capacity.add_argument("--spot", dest="spot", action="store_true", default=None)
    capacity.add_argument("--on-demand", dest="spot", action="store_false")
    gpus.set_defaults(handler=_gpus)
    for name, what in DELEGATED.items():  # listed in the help; parsed by their own modules (see above)
        commands.add_parser(name, help=what)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, ValidationError) as error:  # bad files or names: a clear message, not a traceback
        print(f"oppen: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `oppen ledger | head`: the reader has what it wanted
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
