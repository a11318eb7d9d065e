"""What the API refuses, as types: each carries one sentence for a person and an exit code for the CLI.

The CLI prints `oppen: <sentence>` and exits with `exit_code`; the MCP server returns the sentence
as a tool error. Nothing here is a traceback a user has to read.
"""

from __future__ import annotations


class ApiError(Exception):
    """A request the API cannot serve; `str(error)` says what is wrong and what to do."""

    exit_code = 1
    kind = "error"


class InvalidInput(ApiError, ValueError):
    """The request itself is wrong (an unknown field, a bad number, a mistyped name)."""

    exit_code = 2
    kind = "invalid"


class NotFound(ApiError, LookupError):
    """It names something that does not exist (a deployment, a flow run, an MLflow run, a team)."""

    exit_code = 3
    kind = "not_found"


class Refused(ApiError):
    """A valid request that policy refuses: it does not fit its budget, or the run is already final."""

    exit_code = 4
    kind = "refused"


class Unavailable(ApiError):
    """A service it needs (Prefect, MLflow, the ledger, the cluster) did not answer."""

    exit_code = 5
    kind = "unavailable"
