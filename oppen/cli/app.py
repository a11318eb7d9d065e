"""The Typer app, and what every command shares: `--json`, key=value options, and lazy imports.

Commands import the API (and with it Prefect, MLflow, torch) inside their bodies, so `oppen --help`
and a mistyped command answer at once.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="oppen", no_args_is_help=True, add_completion=False, rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Cost-aware ML training on Prefect: quote, queue, run, meter and report training jobs.\n\n"
         "Every command takes [bold]--json[/] for scripts. Exit codes: 0 ok, 1 error, 2 invalid input, "
         "3 not found, 4 refused (budget, or already final), 5 a service is down.",
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as JSON (the API's model) instead of tables.")]


def pairs(values: list[str] | None, what: str = "option") -> dict[str, Any]:
    """k=v pairs; v is JSON when it parses (numbers, booleans, objects), else a string. Dotted keys nest."""
    from oppen.api.errors import InvalidInput

    result: dict[str, Any] = {}
    for item in values or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidInput(f"{what} expects key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = result
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return result


def register_commands() -> None:
    from oppen.cli import costs, info, ops, serve, training  # noqa: F401  (each adds its commands to `app`)
