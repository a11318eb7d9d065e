"""The MCP server: every `oppen.api` tool, with its pydantic schemas, over stdio or streamable HTTP.

    oppen mcp                                  stdio (what an agent host launches)
    oppen mcp --transport http --port 8770     streamable HTTP at http://127.0.0.1:8770/mcp

Built on the `mcp` package's 2.x `MCPServer`. Each tool is the API function itself: its parameters
and return model become the tool's input and output schemas, and the SDK runs it in a worker thread
(the API is synchronous). A refusal the API anticipates (bad input, not found, over budget, a service
down) reaches the agent as a tool error with the API's one sentence; a crash is logged with its
traceback on stderr and the agent sees only that the tool failed.

Tools that change something are annotated read-only false (cancel as destructive too); the rest
are read-only and idempotent, so a host may call them without asking. `trigger_training` and
`queue_training_job` quote the run first and refuse it when it does not fit its budget.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass

INSTRUCTIONS = (
    "Oppen runs ML training as Prefect deployments with budgets. Quote before you spend: "
    "validate_job_resources or compare_training_configs tell what a job will cost and whether its budget "
    "can take it; trigger_training and queue_training_job quote and hold the money, and refuse a job that "
    "does not fit. Amounts are exact: *_micros fields are integer micro-dollars, *_usd the same in dollars."
)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    changes: bool = False  # creates, cancels or moves something
    destructive: bool = False  # ends something a person started
    idempotent: bool = True
    title: str = ""


TOOLS = [
    ToolSpec("list_experiments", title="List experiments"),
    ToolSpec("get_experiment_metrics", title="Metrics of an MLflow run"),
    ToolSpec("trigger_training", changes=True, idempotent=False, title="Start a training run"),
    ToolSpec("get_training_status", title="Status of a training run"),
    ToolSpec("calculate_training_cost", title="What a run cost"),
    ToolSpec("get_gpu_availability", title="Free GPUs"),
    ToolSpec("validate_job_resources", title="Check and quote a job"),
    ToolSpec("check_training_quota", title="A team's budgets"),
    ToolSpec("recommend_cost_optimization", title="Savings for a run"),
    ToolSpec("forecast_training_cost", title="Forecast a run's cost"),
    ToolSpec("compare_training_configs", title="Compare configs on cost, time and quality"),
    ToolSpec("queue_training_job", changes=True, idempotent=False, title="Queue a training job"),
    ToolSpec("get_job_queue_status", title="The work queues"),
    ToolSpec("cancel_training_job", changes=True, destructive=True, title="Cancel a job"),
    ToolSpec("get_training_health_status", title="Platform health"),
    ToolSpec("generate_cost_report", title="Cost report"),
    ToolSpec("get_resource_utilization_report", title="Resource utilization"),
    ToolSpec("submit_batch_training", changes=True, idempotent=True, title="Run a batch of jobs"),
    ToolSpec("get_batch_status", title="Status of a batch"),
    ToolSpec("register_model", changes=True, idempotent=False, title="Register a model version"),
    ToolSpec("promote_model", changes=True, idempotent=True, title="Promote a model version"),
]


def as_tool(fn: Callable) -> Callable:
    """The API function, with its anticipated refusals turned into tool errors (one sentence, no traceback)."""
    from mcp.server.mcpserver.exceptions import ToolError

    from oppen.api.errors import ApiError

    @functools.wraps(fn)
    def tool(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ApiError as error:
            raise ToolError(f"{error.kind}: {error}") from None

    return tool


def build_server():
    from mcp.server.mcpserver import MCPServer
    from mcp_types import ToolAnnotations

    from oppen import api

    server = MCPServer(name="oppen", title="Oppen: cost-aware ML training", instructions=INSTRUCTIONS,
                       version=_version())
    for spec in TOOLS:
        fn = getattr(api, spec.name)
        server.add_tool(
            as_tool(fn), name=spec.name, title=spec.title, description=(fn.__doc__ or "").strip(),
            annotations=ToolAnnotations(title=spec.title, read_only_hint=not spec.changes,
                                        destructive_hint=spec.destructive if spec.changes else None,
                                        idempotent_hint=spec.idempotent, open_world_hint=False),
        )
    return server


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("oppen")
    except PackageNotFoundError:
        return "0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oppen mcp", description="Serve Oppen's tools over MCP.")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="http: the address to listen on")
    parser.add_argument("--port", type=int, default=8770, help="http: the port to listen on")
    args = parser.parse_args(argv)
    server = build_server()
    # Everything built so far (Prefect's, MLflow's and pydantic's modules: about 230,000 objects) lives as
    # long as the server. Frozen out of the collector, a full collection walks only what the calls make,
    # instead of stopping whichever call triggers it for about 100 ms (bench/tools.py measures both).
    gc.collect()
    gc.freeze()
    if args.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=args.host, port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
