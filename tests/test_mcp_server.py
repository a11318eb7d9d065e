"""The MCP server through the SDK's own client over stdio (and streamable HTTP), against a real Prefect server."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from oppen.api import context
from oppen.mcp_server import TOOLS
from tests.stack import poll_until

pytestmark = [pytest.mark.slow, pytest.mark.integration]
BIN = Path(sys.executable).parent
TINY = {"epochs": 1, "max_steps": 20, "batch_size": 64}


def _params(stack):
    from mcp.client.stdio import StdioServerParameters

    return StdioServerParameters(command=str(BIN / "oppen"), args=["mcp"], env=stack.env, cwd=str(stack.root))


async def _session(server, calls):
    from mcp import Client

    async with Client(server, read_timeout_seconds=120) as client:
        return [await call(client) for call in calls]


def _call(name: str, arguments: dict):
    return lambda client: client.call_tool(name, arguments)




def test_tools_are_listed_with_schemas_and_hints(in_process):
    async def listing(client):
        return (await client.list_tools()).tools

    (tools,) = asyncio.run(_session(_params(in_process), [listing]))
    by_name = {tool.name: tool for tool in tools}
    assert set(by_name) == {spec.name for spec in TOOLS}
    trigger, cancel, forecast = by_name["trigger_training"], by_name["cancel_training_job"], by_name["forecast_training_cost"]
    assert trigger.annotations.read_only_hint is False and cancel.annotations.destructive_hint is True
    assert forecast.annotations.read_only_hint is True
    assert "workload" in trigger.input_schema["properties"] and "flow_run_id" in (trigger.output_schema or {})["properties"]
    assert "budget" in trigger.description.lower() or "quote" in trigger.description.lower()


def test_trigger_forecast_queue_and_cancel_over_stdio(in_process, paused_background, shoestring_team):
    server = _params(in_process)
    triggered, refused = asyncio.run(_session(server, [
        _call("trigger_training", {"workload": "mnist", "run": TINY | {"seed": 21}, "cost": {"max_cost_usd": 0.5}}),
        _call("trigger_training", {"workload": "mnist", "run": TINY, "cost": {"team": shoestring_team, "max_cost_usd": 0.5}}),
    ]))
    assert not triggered.is_error, triggered.content
    flow_run_id = triggered.structured_content["flow_run_id"]
    assert refused.is_error and "refused" in refused.content[0].text and "over budget" in refused.content[0].text
    assert in_process.final_state(flow_run_id).is_completed()

    forecast, queued = asyncio.run(_session(server, [
        _call("forecast_training_cost", {"run": flow_run_id, "remaining_epochs": 1}),
        _call("queue_training_job", {"job": {"workload": "mnist", "run": TINY | {"seed": 22},
                                             "cost": {"max_cost_usd": 0.5}}, "priority": "background"}),
    ]))
    assert not forecast.is_error, forecast.content
    predicted = forecast.structured_content
    assert predicted["flow_run_id"] == flow_run_id and predicted["remaining_epochs"] == 1
    assert predicted["additional_usd"] > 0 and predicted["forecast_usd"] > predicted["accrued_usd"]
    assert not queued.is_error, queued.content
    queued_id, held = queued.structured_content["flow_run_id"], queued.structured_content["held_micros"]
    assert held > 0

    (cancelled,) = asyncio.run(_session(server, [
        _call("cancel_training_job", {"flow_run_id": queued_id, "reason": "agent changed its mind"})]))
    assert not cancelled.is_error, cancelled.content
    assert cancelled.structured_content["released_micros"] == held
    with context.ledger() as ledger:
        assert ledger.queue_hold(queued_id).status == "cancelled"


def test_streamable_http_serves_the_same_tools(in_process):
    from oppen.local_stack import free_port

    port = free_port()
    server = subprocess.Popen([str(BIN / "oppen"), "mcp", "--transport", "http", "--port", str(port)],
                              env=in_process.env, cwd=in_process.root, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/mcp"

        async def try_health(client):
            return await client.call_tool("check_training_quota", {"team": "default"})

        def ready():
            try:
                return asyncio.run(_session(url, [try_health]))[0]
            except Exception:  # not listening yet
                return None

        result = poll_until(ready, timeout=60, interval=0.5)
        assert result is not None and not result.is_error, result
        assert result.structured_content["team"] == "default"
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=15)
