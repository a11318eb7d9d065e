"""Operator commands over the ledger and the deployments: budgets, ledger, reconcile, check, submit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ConfigDict

from oppen.cli.app import JsonFlag, app, pairs
from oppen.cli.progress import waiting
from oppen.cli.render import console, show

budgets = typer.Typer(help="Teams and budgets.", no_args_is_help=True)
app.add_typer(budgets, name="budgets", rich_help_panel="Cost and budgets")


class BudgetRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    team: str
    experiment: str
    period: str
    budget_micros: int
    spent_micros: int
    held_micros: int
    used_fraction: float


class LedgerRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    created_at: str
    run_key: str
    team: str
    experiment: str
    workload: str
    status: str
    attempts: int
    quote_micros: int
    held_micros: int
    spent_micros: int
    cap_micros: int | None
    reason: str | None


@budgets.command("apply")
def budgets_apply(
    file: Annotated[Path | None, typer.Option(help="Budgets YAML (default: $OPPEN_BUDGETS_FILE or the shipped file).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Create or update teams and budgets from a file (idempotent)."""
    with waiting("Applying the budgets file to the ledger…", json_output):
        from oppen.cost.budgets import apply_budgets, load_budgets, open_ledger
        from oppen.settings import load_settings

        settings = load_settings()
        spec = load_budgets(file or settings.budgets_file)
        ledger = open_ledger(settings.ledger, file or settings.budgets_file)
        try:
            changes = apply_budgets(ledger, spec)
        finally:
            ledger.dispose()
    if json_output:
        show({"changes": changes}, True)
    else:
        console.print("\n".join(changes) if changes else "no changes", highlight=False)


@budgets.command("list")
def budgets_list(json_output: JsonFlag = False) -> None:
    """Every budget with what is spent and held against it this period."""
    with waiting("Reading the budgets and their use from the ledger…", json_output):
        from oppen.api.context import ledger
        from oppen.cost.ledger import month_of, utcnow

        month, rows = month_of(utcnow()), []
        with ledger() as opened:
            for team in opened.team_names():
                for budget in opened.budgets_of(team):
                    spent, held = opened.usage(team, budget["experiment"] or None,
                                               month if budget["period"] == "monthly" else None)
                    rows.append(BudgetRow(team=team, experiment=budget["experiment"] or "*", period=budget["period"],
                                          budget_micros=budget["amount_micros"], spent_micros=spent, held_micros=held,
                                          used_fraction=(spent + held) / budget["amount_micros"]))
    show(rows, json_output, title=f"budgets ({month})")


@app.command("ledger", rich_help_panel="Cost and budgets")
def ledger_rows(
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    experiment: Annotated[str | None, typer.Option(help="Only this experiment.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="The newest N runs.")] = 50,
    json_output: JsonFlag = False,
) -> None:
    """Runs in the ledger: quote, cap, held, spent and attempts, newest last."""
    with waiting("Reading the ledger's runs…", json_output):
        from oppen.api.context import ledger

        with ledger() as opened:
            found = opened.rows(team=team, experiment=experiment)[-limit:]
    rows = [LedgerRow(created_at=f"{row['created_at']:%Y-%m-%d %H:%M}", run_key=row["run_key"], team=row["team"],
                      experiment=row["experiment"], workload=row["workload"] or "", status=row["status"],
                      attempts=row["attempts"], quote_micros=row["quote_micros"], held_micros=row["held_micros"],
                      spent_micros=row["spent_micros"], cap_micros=row["cap_micros"], reason=row["reason"])
            for row in found]
    show(rows, json_output, title="ledger", columns=None if json_output else [
        "created_at", "team", "experiment", "status", "attempts", "quote_micros", "cap_micros", "held_micros",
        "spent_micros", "run_key"])


@app.command(rich_help_panel="Operations")
def reconcile(
    no_expire: Annotated[bool, typer.Option("--no-expire", help="Only book the journal; leave expired holds.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Book settlements the ledger missed while it was down; charge holds past their expiry."""
    with waiting("Booking the settlement journal into the ledger" + ("…" if no_expire else ", charging expired holds…"),
                 json_output):
        from oppen.api.context import ledger
        from oppen.cost.journal import SettlementJournal
        from oppen.cost.money import format_usd
        from oppen.cost.reconcile import reconcile as run_reconcile
        from oppen.settings import load_settings

        journal = SettlementJournal(load_settings().journal_dir())
        with ledger() as opened:
            results = run_reconcile(opened, journal, expire=not no_expire)
    if json_output:
        show([{"outcome": r.outcome, "cost_micros": r.cost_micros, "run_key": r.run_key, "attempt_id": r.attempt_id,
               "detail": r.detail} for r in results], True)
    else:
        for item in results:
            amount = format_usd(item.cost_micros) if item.cost_micros is not None else "-"
            print(f"{item.outcome:<16} {amount:>12} {item.run_key} {item.attempt_id} {item.detail}".rstrip())
        if not results:
            print(f"nothing to reconcile (journal {journal.directory})")
    if any(item.outcome in ("refused", "unreadable") for item in results):
        raise typer.Exit(1)


@app.command(rich_help_panel="Operations")
def check(json_output: JsonFlag = False) -> None:
    """Check prefect.yaml's deployments against the pools file (pool, queue, job variables)."""
    from oppen.submit import check_prefect_yaml

    lines = check_prefect_yaml()
    show({"checked": lines}, True) if json_output else print("\n".join(lines))


@app.command(rich_help_panel="Operations")
def submit(
    name: Annotated[str, typer.Argument(help="FLOW/DEPLOYMENT, e.g. train-mnist/gpu or cost-report/local.")],
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="Flow parameter k=v; repeatable.")] = None,
    job_variable: Annotated[list[str] | None, typer.Option("--job-variable", "-j", help="Job variable k=v; repeatable.")] = None,
    queue: Annotated[str | None, typer.Option(help="Work queue (default: the deployment's).")] = None,
    check_cluster: Annotated[bool, typer.Option(help="Kubernetes pool: refuse what no node or quota can take.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Check, then run any deployment (training runs are better started with `oppen train`: quoted and held)."""
    where = " against the cluster" if check_cluster else ""
    with waiting(f"Checking {name}'s job variables{where}, then submitting it…", json_output):
        import asyncio

        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        from oppen.api.errors import InvalidInput, NotFound
        from oppen.submit import submit as run_submit

        try:
            flow_run_id, verdict = asyncio.run(run_submit(name, pairs(param, "--param"),
                                                          pairs(job_variable, "--job-variable"), queue, check_cluster))
        except ObjectNotFound:
            raise NotFound(f"no deployment {name} on this Prefect server; `prefect deployment ls` lists them") from None
        except PrefectHTTPStatusError as error:
            raise InvalidInput(f"Prefect refused the run of {name}: {_detail(error)}") from None
    result = {"flow_run_id": flow_run_id, "cluster": verdict.reason if verdict is not None else None}
    if json_output:
        show(result, True)
    else:
        if verdict is not None:
            print(f"cluster: {verdict.reason}")
        print(f"flow run {flow_run_id}")


def _detail(error) -> str:
    try:
        return str(error.response.json().get("detail"))
    except ValueError:
        return error.response.text


@app.command(rich_help_panel="Operations")
def gpus(
    spot: Annotated[bool | None, typer.Option("--spot/--on-demand", help="Kubernetes: only spot or on-demand nodes.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Free GPUs: per type in the current kube context, else this machine's devices."""
    with waiting("Reading free GPUs from the kube context (else this machine) and the pools' limits…", json_output):
        from oppen.api.resources import get_gpu_availability

        found = get_gpu_availability(spot=spot)
    show(found, json_output, title="GPUs")
