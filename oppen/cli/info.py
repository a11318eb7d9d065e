"""Reading commands: experiments, metrics, health; and the model registry."""

from __future__ import annotations

from typing import Annotated

import typer

from oppen.cli.app import JsonFlag, app
from oppen.cli.progress import waiting
from oppen.cli.render import show

models = typer.Typer(help="The model registry: register and promote versions.", no_args_is_help=True)
app.add_typer(models, name="models", rich_help_panel="Experiments and models")


@app.command(rich_help_panel="Experiments and models")
def experiments(
    contains: Annotated[str | None, typer.Option(help="Only names containing this.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    json_output: JsonFlag = False,
) -> None:
    """MLflow experiments with their runs, best result and what they cost."""
    with waiting("Reading experiments from MLflow and their spend from the ledger…", json_output):
        from oppen.api.experiments import list_experiments

        found = list_experiments(name_contains=contains, max_results=limit)
    show(found, json_output, title="experiments")


@app.command(rich_help_panel="Experiments and models")
def metrics(run_id: Annotated[str, typer.Argument(help="An MLflow run id.")], json_output: JsonFlag = False) -> None:
    """One MLflow run: params, latest metrics by group, tags, model versions and links."""
    with waiting(f"Reading MLflow run {run_id}…", json_output):
        from oppen.api.experiments import get_experiment_metrics

        run = get_experiment_metrics(run_id)
    show(run, json_output, title=f"run {run_id}")


@app.command(rich_help_panel="Operations")
def health(json_output: JsonFlag = False) -> None:
    """Prefect, workers, MLflow and the ledger; late runs, recent failures and alerts."""
    with waiting("Checking Prefect, its workers, MLflow and the ledger…", json_output):
        from oppen.api.health import get_training_health_status

        status = get_training_health_status()
    show(status, json_output, title="health")
    if not status.healthy:
        raise typer.Exit(1)


@models.command("register")
def register(
    run_id: Annotated[str, typer.Argument(help="The MLflow run whose model to register.")],
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    alias: Annotated[str | None, typer.Option(help="Alias to set on the new version.")] = "development",
    json_output: JsonFlag = False,
) -> None:
    """Register a run's model as a new version."""
    with waiting(f"Registering the model of run {run_id} as {name}…", json_output):
        from oppen.api.registry import register_model

        registered = register_model(run_id, name, alias=alias)
    show(registered, json_output, title="registered")


@models.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    target: Annotated[str, typer.Argument(help="staging or production.")],
    version: Annotated[int | None, typer.Option(help="The version (default: the one below the target).")] = None,
    force: Annotated[bool, typer.Option(help="Promote even if it is not better than the current one.")] = False,
    json_output: JsonFlag = False,
) -> None:
    """Promote a version to staging or production, when it beats the one there (or --force)."""
    with waiting(f"Promoting {name} to {target}…", json_output):
        from oppen.api.registry import promote_model

        result = promote_model(name, target, version=version, force=force)
    show(result, json_output, title="promotion")
    if not result.promoted:
        raise typer.Exit(4)
