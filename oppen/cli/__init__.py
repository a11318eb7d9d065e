"""`oppen`: the command line over `oppen.api` (Typer and rich; `--json` on every command).

A user's mistake is one line on stderr and an exit code, never a traceback:
0 ok, 1 error, 2 invalid input (or usage), 3 not found, 4 refused, 5 a service is down, 130 interrupted.
`oppen automations ...` and `oppen mlflow-webhook ...` are parsed by their own modules.
"""

from __future__ import annotations

import sys

DELEGATED = {"automations": "automations as code: apply automations.yaml",
             "mlflow-webhook": "serve or register the MLflow registry webhook receiver",
             "exporter": "serve Oppen's platform metrics (queues, budgets, outcomes) for Prometheus",
             "alerts": "serve the Alertmanager webhook receiver (Prometheus alerts to Prefect events)"}


def _delegate(command: str, rest: list[str]) -> int:
    if command == "automations":
        from oppen.automations import main as automations_main

        return automations_main(rest)
    if command == "exporter":
        from oppen.metrics.platform_exporter import main as exporter_main

        return exporter_main(rest)
    if command == "alerts":
        from oppen.alerts.receiver import main as alerts_main

        return alerts_main(rest)
    from oppen.mlflow_webhook_receiver import main as receiver_main

    return receiver_main(rest)


def _run(argv: list[str]) -> int:
    import typer
    from pydantic import ValidationError
    from typer._click.exceptions import ClickException  # Typer 0.29 carries its own click

    from oppen.api.errors import ApiError
    from oppen.cli.app import app, register_commands
    from oppen.cli.render import fail

    register_commands()
    for name, what in DELEGATED.items():  # listed in the help; parsed by their own modules (see _delegate)
        app.command(name, help=what, rich_help_panel="Operations", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
            lambda: None)
    try:
        result = typer.main.get_command(app).main(args=argv, prog_name="oppen", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except ApiError as error:
        fail(str(error))
        return error.exit_code
    except ValidationError as error:  # a bad file (budgets, batch jobs): pydantic's sentence, no traceback
        from oppen.api.quoting import validation_sentence

        fail(validation_sentence(error, error.title))
        return 2
    except ValueError as error:  # a malformed file or name found below the API (budgets, pools)
        fail(str(error))
        return 2
    except typer.Exit as done:
        return done.exit_code
    except ClickException as error:  # usage: an unknown option, a missing argument
        error.show()
        return error.exit_code
    except typer.Abort:
        return 130
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `oppen ledger | head`: the reader has what it wanted
        sys.stderr.close()
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return _delegate(argv[0], argv[1:])
    return _run(argv)


if __name__ == "__main__":
    sys.exit(main())
