"""`oppen mcp`: the MCP server (stdio for agent hosts, streamable HTTP for remote agents)."""

from __future__ import annotations

from typing import Annotated

import typer

from oppen.cli.app import app


@app.command(rich_help_panel="Operations")
def mcp(
    transport: Annotated[str, typer.Option(help="stdio (an agent host launches it) or http (streamable HTTP).")] = "stdio",
    host: Annotated[str, typer.Option(help="http: address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="http: port to listen on (the endpoint is /mcp).")] = 8770,
) -> None:
    """Serve every Oppen tool over MCP (the `mcp` package's MCPServer)."""
    from oppen.mcp_server import main as serve

    if transport not in ("stdio", "http"):
        from oppen.api.errors import InvalidInput

        raise InvalidInput(f"transport {transport!r} is not stdio or http")
    raise typer.Exit(serve(["--transport", transport, "--host", host, "--port", str(port)]))
