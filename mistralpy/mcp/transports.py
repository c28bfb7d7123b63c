"""Open one server's transport with the SDK: an async context manager of (read stream, write
stream) for ``ClientSession``. Leaving it ends the connection (a child process gets its stdin
closed, then SIGTERM / SIGKILL of its process group, the SDK's shutdown sequence)."""
from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio

from mistralpy.mcp.config import HttpSource, McpServerConfig, ProcessSource, SseSource, WebSocketSource

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 30.0     # connect / write timeout when the source names none
SSE_READ_TIMEOUT_S = 300.0  # a response stream may stay open this long between events (calls have their own timeout)


def request_headers(server: McpServerConfig) -> dict[str, str] | None:
    """The source's headers plus ``Authorization: Bearer <bearer_token>`` (as mistral.rs merges them)."""
    source = server.source
    headers = dict(getattr(source, "headers", None) or {})
    if server.bearer_token:
        headers["Authorization"] = f"Bearer {server.bearer_token}"
    return headers or None


def _errlog() -> Any:
    # The child's stderr must be a real file: pytest and IDEs replace sys.stderr with objects without one.
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):
            continue
    return open(os.devnull, "w")  # lives as long as the process


@asynccontextmanager
async def open_transport(server: McpServerConfig) -> AsyncIterator[tuple[Any, Any]]:
    source = server.source
    if isinstance(source, ProcessSource):
        from mcp.client.stdio import StdioServerParameters, stdio_client

        if server.bearer_token:
            log.debug("MCP server %s: bearer_token has no meaning for a Process source", server.key)
        # mistral.rs starts the child with the whole environment plus `env` (the SDK alone would
        # pass only HOME/PATH/...): servers that read API keys from the environment keep working.
        params = StdioServerParameters(command=source.command, args=list(source.args),
                                       env={**os.environ, **(source.env or {})}, cwd=source.work_dir)
        async with stdio_client(params, errlog=_errlog()) as (read, write):
            yield read, write
    elif isinstance(source, HttpSource):
        import httpx
        from mcp.client.streamable_http import streamable_http_client

        timeout = httpx.Timeout(source.timeout_secs or HTTP_TIMEOUT_S, read=max(SSE_READ_TIMEOUT_S,
                                                                                source.timeout_secs or 0))
        http = httpx.AsyncClient(headers=request_headers(server), timeout=timeout, follow_redirects=True)
        async with http, streamable_http_client(source.url, http_client=http) as (read, write, _session_id):
            yield read, write
    elif isinstance(source, SseSource):
        from mcp.client.sse import sse_client

        async with sse_client(source.url, headers=request_headers(server), timeout=source.timeout_secs or
                              HTTP_TIMEOUT_S, sse_read_timeout=SSE_READ_TIMEOUT_S) as (read, write):
            yield read, write
    elif isinstance(source, WebSocketSource):
        headers = request_headers(server)
        if headers:  # the SDK's websocket_client takes no headers
            async with _websocket_with_headers(source.url, headers, source.timeout_secs) as streams:
                yield streams
        else:
            import warnings

            from mcp.client.websocket import websocket_client

            with warnings.catch_warnings():  # deprecated in SDK 1.x: the config format still has it
                warnings.simplefilter("ignore", DeprecationWarning)
                cm = websocket_client(source.url)
            async with cm as streams:
                yield streams
    else:  # pragma: no cover - parse_source makes only the four
        raise TypeError(f"unknown MCP source {source!r}")


@asynccontextmanager
async def _websocket_with_headers(url: str, headers: dict[str, str],
                                  timeout_s: float | None) -> AsyncIterator[tuple[Any, Any]]:
    """The SDK's WebSocket transport (``mcp`` subprotocol, one JSON-RPC message per text frame)
    with request headers, which its websocket_client cannot send."""
    from mcp import types
    from mcp.shared.message import SessionMessage
    from pydantic import ValidationError
    from websockets.asyncio.client import connect

    read_writer, read_stream = anyio.create_memory_object_stream[Any](0)
    write_stream, write_reader = anyio.create_memory_object_stream[Any](0)
    async with connect(url, subprotocols=["mcp"], additional_headers=headers,
                       open_timeout=timeout_s or HTTP_TIMEOUT_S) as ws:

        async def reader() -> None:
            async with read_writer:
                async for frame in ws:
                    try:
                        msg = types.JSONRPCMessage.model_validate_json(frame)
                    except ValidationError as exc:
                        await read_writer.send(exc)
                        continue
                    await read_writer.send(SessionMessage(msg))

        async def writer() -> None:
            async with write_reader:
                async for message in write_reader:
                    body = message.message.model_dump(by_alias=True, mode="json", exclude_none=True)
                    await ws.send(json.dumps(body))

        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            tg.start_soon(writer)
            try:
                yield read_stream, write_stream
            finally:
                tg.cancel_scope.cancel()
