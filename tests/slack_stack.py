"""A Prefect server whose automations post to a local Slack: the team `vision` has its own channel."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.prefect_api import prefect_api
from tests.stack import PrefectStack

BUDGETS = "teams:\n  vision:\n    budget: {amount_usd: 100}\n    slack_channel: '#vision-runs'\n"


@contextlib.contextmanager
def slack_stack(root: Path, slack_api_url: str, token: str, server_env: dict[str, str] | None = None,
                env: dict[str, str] | None = None) -> Iterator[PrefectStack]:
    """The server started, this process's clients and Oppen's settings pointed at it; stopped on every exit."""
    stack = PrefectStack(root)
    stack.env.update(server_env or {})
    budgets = root / "budgets.yaml"
    budgets.write_text(BUDGETS)
    settings = {"OPPEN_HOME": str(root / "oppen"), "OPPEN_SLACK_BOT_TOKEN": token, "OPPEN_SLACK_API_URL": slack_api_url,
                "OPPEN_SLACK_CHANNEL": "#ml-runs", "OPPEN_BUDGETS_FILE": str(budgets), **(env or {})}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in settings.items():
            patch.setenv(key, value)
        try:
            stack.start_server()
            with prefect_api(stack.api_url):
                yield stack
        finally:
            stack.stop()
