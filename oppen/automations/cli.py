"""Oppen's Prefect automations, kept in automations.yaml and applied to a server by one idempotent command.

    python -m oppen.automations apply [--file automations.yaml] [--prune] [--set name=value ...] [--json]

Each automation is created, or updated by name; one that already matches the server's copy is not touched.
`--prune` deletes the automations named "oppen: ..." that the file no longer lists, and nothing else. Slack
goes through the Webhook block `oppen-slack` (a bot token's chat.postMessage, or an incoming webhook) and the
variable `oppen_automations`, both kept in step by the same command.
Prints one line per change; exit status 2 for a bad file or setting (one sentence), 1 when applying fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from oppen.automations.apply import ApplyFailed, apply_automations
from oppen.automations.spec import DEFAULT_FILE, AutomationsFileError


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AutomationsFileError(f"--set takes name=value, not {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oppen.automations", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    apply = commands.add_parser("apply", help="create or update the file's automations (idempotent)")
    apply.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the automations file (default: %(default)s)")
    apply.add_argument("--prune", action="store_true", help='delete "oppen: ..." automations the file no longer lists')
    apply.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME=VALUE",
                       help="override a setting of the file (e.g. late_after_minutes=15)")
    apply.add_argument("--json", action="store_true", help="print the changes as JSON")
    args = parser.parse_args(argv)
    try:
        changes = apply_automations(args.file, prune=args.prune, overrides=_parse_sets(args.sets))
    except AutomationsFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ApplyFailed as error:
        print(f"error: applying the automations failed: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([change._asdict() for change in changes], indent=2))
    else:
        print("\n".join(change.line() for change in changes))
    return 0
