"""Automations as code: automations.yaml applied to a Prefect server by one idempotent command.

    spec.py          the file's models, loading, `$setting` substitution, one-sentence errors
    render.py        the file as Prefect Automation objects, checked as Prefect would check them
    slack_webhook.py the Slack Webhook block's contents and the template variable, found as runs find Slack
    apply.py         create, update, skip or prune on the server, reported as `Change`s
    cli.py           `python -m oppen.automations apply ...` (also `oppen automations apply ...`)

The names callers use are re-exported here, so `from oppen.automations import ...` reads as before the split.
"""

from oppen.automations.apply import BLOCK_NAME, VARIABLE_NAME, ApplyFailed, Change, apply_automations
from oppen.automations.cli import main
from oppen.automations.render import CLOUD_ONLY, Planned, render_automations
from oppen.automations.slack_webhook import SLACK_API_URL, SlackTarget, slack_target, template_variables
from oppen.automations.spec import (
    DEFAULT_FILE,
    MIN_WINDOW_MINUTES,
    PREFIX,
    AutomationsFile,
    AutomationsFileError,
    AutomationSpec,
    PrefectAction,
    Settings,
    SlackAction,
    load_automations_file,
)

__all__ = [
    "BLOCK_NAME", "CLOUD_ONLY", "DEFAULT_FILE", "MIN_WINDOW_MINUTES", "PREFIX", "SLACK_API_URL", "VARIABLE_NAME",
    "ApplyFailed", "AutomationSpec", "AutomationsFile", "AutomationsFileError", "Change", "Planned",
    "PrefectAction", "Settings", "SlackAction", "SlackTarget",
    "apply_automations", "load_automations_file", "main", "render_automations", "slack_target",
    "template_variables",
]
