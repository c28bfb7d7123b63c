"""A small MCP server on the official SDK's server class (FastMCP, SDK 1.x), for tests/test_mcp_client.py.

    python tool_server.py stdio [NAME]
    python tool_server.py http PORT [NAME]   (streamable HTTP at /mcp)
    python tool_server.py all PORT [NAME]    (also SSE at /sse and WebSocket at /ws, one process)

Tools: echo, add (structured), configure (nested schema), secret (no arguments, a fixed marker),
grow (adds a tool, notifies tools/list_changed),
fail (isError), hang (sleeps), stall (never answers), crash (the process exits mid-call), picture (an image), whoami
(the request's Authorization header, HTTP transports only). Resource: note://greeting.
"""
from __future__ import annotations

import asyncio
import base64
import os
import sys
from typing import Annotated

from mcp.server.fastmcp import Context, FastMCP, Image
from pydantic import BaseModel, Field

SECRET = "MARKER-7431-tangerine"
# a 1x1 red PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


class Limits(BaseModel):
    low: int = Field(ge=0)
    high: int


class Settings(BaseModel):
    label: str
    limits: Limits
    tags: list[str] = []


def build(name: str, port: int = 0) -> FastMCP:
    mcp = FastMCP(name, host="127.0.0.1", port=port, log_level="WARNING")

    @mcp.tool()
    def echo(text: Annotated[str, Field(max_length=12)]) -> str:
        """Repeat the text."""
        return f"echo: {text}"

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool()
    def configure(settings: Settings, dry_run: bool = False) -> str:
        """Apply settings (nested object schema)."""
        return f"configured {settings.label} {settings.limits.low}..{settings.limits.high} dry={dry_run}"

    @mcp.tool()
    def secret() -> str:
        """The secret word."""
        return SECRET

    @mcp.tool()
    def fail() -> str:
        """Always fails."""
        raise ValueError("failed on purpose")

    @mcp.tool()
    async def hang(seconds: float = 3600) -> str:
        """Sleeps."""
        await asyncio.sleep(seconds)
        return "woke up"

    @mcp.tool()
    async def stall() -> str:
        """Never answers."""
        await asyncio.sleep(3600)
        return "late"

    @mcp.tool()
    def crash() -> str:
        """The server process exits in the middle of the call."""
        os._exit(7)

    @mcp.tool()
    def picture() -> Image:
        """A 1x1 PNG."""
        return Image(data=PNG, format="png")

    @mcp.tool()
    async def grow(ctx: Context) -> str:
        """Adds a tool `extra`, and tells the client (notifications/tools/list_changed)."""
        mcp.add_tool(lambda: "extra!", name="extra", description="Added at run time.")
        await ctx.session.send_tool_list_changed()
        return "grown"

    @mcp.resource("note://greeting", mime_type="text/plain")
    def greeting() -> str:
        return f"hello from {name}"

    @mcp.tool()
    def whoami(ctx: Context) -> str:
        """The Authorization header of the HTTP request."""
        request = ctx.request_context.request
        return str(request.headers.get("authorization")) if request is not None else "no request"

    return mcp


def main() -> None:
    if os.environ.get("MCP_TEST_PIDFILE"):  # the tests check that every server process ends
        with open(os.environ["MCP_TEST_PIDFILE"], "a") as f:
            f.write(f"{os.getpid()}\n")
    mode = sys.argv[1]
    if mode == "stdio":
        build(sys.argv[2] if len(sys.argv) > 2 else "py").run("stdio")
        return
    port = int(sys.argv[2])
    mcp = build(sys.argv[3] if len(sys.argv) > 3 else "web", port)
    if mode == "http":
        mcp.run("streamable-http")
        return
    if mode != "all":
        raise SystemExit(f"unknown mode {mode!r}")
    # one process, every network transport: streamable HTTP at /mcp, SSE at /sse, WebSocket at /ws
    import uvicorn
    from mcp.server.websocket import websocket_server
    from starlette.routing import WebSocketRoute

    async def ws_endpoint(websocket) -> None:
        server = mcp._mcp_server
        async with websocket_server(websocket.scope, websocket.receive, websocket.send) as (read, write):
            await server.run(read, write, server.create_initialization_options())

    app = mcp.streamable_http_app()  # its lifespan runs the streamable HTTP session manager
    app.router.routes.extend(mcp.sse_app().routes)
    app.router.routes.append(WebSocketRoute("/ws", ws_endpoint))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
