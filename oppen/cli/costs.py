"""Money commands: quote, forecast, compare, cost, quota, report, utilization, recommend."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated

import typer

from oppen.cli.app import JsonFlag, app
from oppen.cli.progress import waiting
from oppen.cli.render import console, show
from oppen.cli.training import Config, Cost, Deployment, Run, Workload, _job, quoting

Since = Annotated[datetime | None, typer.Option(help="From (UTC), e.g. 2026-11-01.")]
Until = Annotated[datetime | None, typer.Option(help="Until (UTC, exclusive).")]
LastDays = Annotated[int | None, typer.Option(min=1, max=3660, help="The last N days (instead of --since).")]


def _range(since: datetime | None, until: datetime | None, last_days: int | None) -> tuple[datetime | None, datetime | None]:
    if last_days is not None:
        from oppen.api.errors import InvalidInput

        if since is not None:
            raise InvalidInput("give --since or --last-days, not both")
        since = datetime.now(timezone.utc) - timedelta(days=last_days)
    return since, until


def _window(since: datetime | None, until: datetime | None) -> str:
    """` from 2026-11-01 until 2026-11-08` for a spinner; nothing for a bound left to the API's default."""
    return (f" from {since:%Y-%m-%d}" if since else "") + (f" until {until:%Y-%m-%d}" if until else "")


@app.command(rich_help_panel="Cost and budgets")
def quote(
    workload: Workload, config: Config = None, run: Run = None, cost: Cost = None, deployment: Deployment = "local",
    experiment: Annotated[str | None, typer.Option(help="MLflow experiment (default: the deployment's).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Check a job's resources and quote it against its budgets, without creating anything."""
    with waiting(quoting(workload, deployment), json_output):
        from oppen.api.planning import validate_job_resources

        verdict = validate_job_resources(_job(workload, deployment, config, run, cost, experiment, None, None))
    show(verdict, json_output, title="quote")
    if not verdict.feasible:
        raise typer.Exit(4)


@app.command(rich_help_panel="Cost and budgets")
def forecast(
    run: Annotated[str, typer.Argument(help="A flow run id or an MLflow run id.")],
    epochs: Annotated[int | None, typer.Option(min=0, max=1000, help="Epochs still to run (default: what its plan has left).")] = None,
    json_output: JsonFlag = False,
) -> None:
    """What a run will cost by its end, or with N more epochs."""
    with waiting(f"Forecasting {run} from its metrics and its speed history…", json_output):
        from oppen.api.forecasting import forecast_training_cost

        result = forecast_training_cost(run, remaining_epochs=epochs)
    show(result, json_output, title="forecast")


@app.command(rich_help_panel="Cost and budgets")
def compare(
    file: Annotated[Path, typer.Argument(help="JSON or YAML list of jobs ({workload, run, config, cost, ...}).",
                                         exists=True, dir_okay=False)],
    json_output: JsonFlag = False,
) -> None:
    """Compare candidate configs on quoted cost, time and the quality their history reached."""
    import yaml

    jobs = yaml.safe_load(file.read_text())
    jobs = jobs.get("jobs", jobs) if isinstance(jobs, dict) else jobs
    count = f"{len(jobs)} configs" if isinstance(jobs, list) else "the configs"
    with waiting(f"Quoting {count} and reading the quality their history reached…", json_output):
        from oppen.api.comparison import compare_training_configs

        comparison = compare_training_configs(jobs)
    if json_output:
        show(comparison, True)
        return
    show(comparison.rows, False, title="comparison", columns=[
        "index", "changes", "expected_usd", "expected_seconds", "fits_budget", "mean_quality", "history_runs",
        "cost_per_point_usd", "cheapest", "fastest", "best", "note"])
    console.print(comparison.summary, highlight=False)


@app.command("cost", rich_help_panel="Cost and budgets")
def run_cost(
    run: Annotated[str, typer.Argument(help="A flow run id or an MLflow run id.")],
    json_output: JsonFlag = False,
) -> None:
    """What a run cost: quote, cap, each attempt, charges per month, exact to the micro-dollar."""
    with waiting(f"Reading the cost of {run} from the ledger and MLflow…", json_output):
        from oppen.api.run_cost import calculate_training_cost

        cost = calculate_training_cost(run)
    show(cost, json_output, title=f"cost of {run}")


@app.command(rich_help_panel="Cost and budgets")
def quota(team: Annotated[str, typer.Argument(help="The team.")] = "default", json_output: JsonFlag = False) -> None:
    """A team's budgets: used (spent and held), limit and what is left."""
    with waiting(f"Reading the budgets of {team} from the ledger…", json_output):
        from oppen.api.reports import check_training_quota

        result = check_training_quota(team)
    show(result, json_output, title=f"quota of {team}")


@app.command(rich_help_panel="Cost and budgets")
def report(
    since: Since = None, until: Until = None, last_days: LastDays = None,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    experiment: Annotated[str | None, typer.Option(help="Only this experiment.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Spend per team and experiment, with quality, cost per point, trend and budgets."""
    start, end = _range(since, until, last_days)
    with waiting(f"Reporting spend{_window(start, end)} from the ledger…", json_output):
        from oppen.api.reports import generate_cost_report

        result = generate_cost_report(start, end, team=team, experiment=experiment)
    show(result, json_output, title="cost report")


@app.command(rich_help_panel="Cost and budgets")
def utilization(
    since: Since = None, until: Until = None, last_days: LastDays = None,
    team: Annotated[str | None, typer.Option(help="Only this team.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Measured CPU/GPU use against what runs paid for, and the money spent idle."""
    start, end = _range(since, until, last_days)
    with waiting(f"Reading measured utilisation{_window(start, end)} from MLflow…", json_output):
        from oppen.api.reports import get_resource_utilization_report

        result = get_resource_utilization_report(start, end, team=team)
    show(result, json_output, title="utilization")


@app.command(rich_help_panel="Cost and budgets")
def recommend(
    run: Annotated[str, typer.Argument(help="A finished run: MLflow run id or flow run id.")],
    json_output: JsonFlag = False,
) -> None:
    """Ways to make a run like this one cheaper, with the saving each is worth."""
    with waiting(f"Comparing {run} with similar runs for savings…", json_output):
        from oppen.api.recommendations import recommend_cost_optimization

        recommendations = recommend_cost_optimization(run)
    show(recommendations, json_output, title="recommendations")
