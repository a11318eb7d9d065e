"""Run a deployment and tell its story in the terminal: the lines that matter while it trains, then a summary."""

from __future__ import annotations

import json

from rich.console import Console

from oppen.terminal.collect import collect
from oppen.terminal.follow import follow_run
from oppen.terminal.summary import render

RULE = "─" * 72


def parse_params(pairs: list[str]) -> dict[str, object]:
    """`key=value` pairs as `prefect deployment run -p` reads them: JSON when the value parses, else text."""
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--param takes key=value, got {pair!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def print_summary(flow_run_id: str, console: Console | None = None) -> None:
    out = console or Console(highlight=False, soft_wrap=True)
    out.print(RULE, markup=False, soft_wrap=True)
    for line in render(collect(flow_run_id)):
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    out.print(RULE, markup=False, soft_wrap=True)


def run_and_follow(deployment: str, params: dict[str, object], console: Console | None = None) -> int:
    """Create a flow run of `deployment` (flow/deployment), follow it to its end, print its summary.

    Returns 0 when the run completed, 1 otherwise (the summary says why).
    """
    from oppen.api import context

    out = console or Console(highlight=False, soft_wrap=True)
    with context.prefect() as client:
        found = client.read_deployment_by_name(deployment)
        flow_run = client.create_flow_run_from_deployment(found.id, parameters=params)
        out.print(f"{deployment}: flow run {flow_run.name} ({flow_run.id}) in queue "
                  f"{found.work_queue_name or 'default'}", markup=False, highlight=False, soft_wrap=True)
        final = follow_run(client, str(flow_run.id), out)
    print_summary(str(flow_run.id), out)
    return 0 if final.state and final.state.is_completed() else 1
