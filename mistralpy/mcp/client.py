"""The MCP client: every configured server on one background event loop thread.

Each server lives in one long-lived asyncio task (``_Connection.run``) that opens its transport,
initializes a ``ClientSession``, lists the tools, then watches the connection (end of the read
stream, periodic pings, ``tools/list_changed``). When the server fails to start or dies, the task
logs it, marks the server's tools unavailable (calls get an error result at once) and reconnects
with exponential backoff; the other servers are not affected. Calls go through a global
semaphore (``max_concurrent_calls``) and a per-call timeout (``tool_timeout_secs``).

The engine is synchronous and the HTTP server async, so calls work from both:
``call_tool`` (a coroutine, awaitable on any event loop: it hops to the client's loop) and
``call_tool_sync`` / ``call_tools_sync`` (blocking, from any thread but the client's own).
"""
from __future__ import annotations

import asyncio
import atexit
import fnmatch
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from contextlib import AsyncExitStack
from typing import Any, Self, TypeVar

import anyio

from mistralpy.mcp.config import McpClientConfig, McpServerConfig
from mistralpy.mcp.results import McpToolResult
from mistralpy.mcp.tools import McpTool

log = logging.getLogger(__name__)
T = TypeVar("T")

BUSY_PING_INTERVAL_S = 2.0
STABLE_S = 10.0  # a connection that lasted this long resets the reconnection backoff


class _WatchedStream:
    """The transport's read stream, telling the connection when it ends (the server exited or
    the connection dropped): the SDK's session only fails the calls then in flight."""

    def __init__(self, inner: Any, on_end: Any) -> None:
        self.inner, self.on_end = inner, on_end

    async def receive(self) -> Any:
        try:
            return await self.inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.on_end()
            raise

    def __aiter__(self) -> _WatchedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _describe(exc: BaseException) -> str:
    """One line for a failure, looking inside the task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    error = getattr(exc, "error", None)  # McpError
    text = getattr(error, "message", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Connection:
    """One server: its session while connected, and its last known tools."""

    def __init__(self, server: McpServerConfig, client: McpClient) -> None:
        self.server, self.client = server, client
        self.session: Any = None
        self.connected = False
        self.tools: dict[str, McpTool] = {}  # replaced whole, so other threads read a consistent dict
        self.last_error: str | None = None
        self.connects = 0
        self.server_info: dict[str, Any] = {}
        self.first_attempt = asyncio.Event()
        self._wake = asyncio.Event()
        self._lost = self._refresh = self._ping_now = False
        self._down = asyncio.Event()  # set when the current connection ends: fails its calls in flight
        self._inflight = 0
        self._up_since: float | None = None
        self.task: asyncio.Task | None = None

    # ---- life cycle (all on the client's loop) ---------------------------------------------------
    async def run(self) -> None:
        client = self.client
        delay = client.backoff_initial_s
        while not client.stopping:
            self._up_since = None
            failure: BaseException | None = None
            try:
                await self._connect_and_watch()
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if client.stopping or (task is not None and task.cancelling()):
                    raise
                failure = exc  # a transport's inner task group cancelled us: a failure like any other
            except Exception as exc:  # noqa: BLE001 - any failure: log, back off, try again
                failure = exc
            finally:
                self.connected, self.session = False, None
            if failure is not None:
                error, self.last_error = self.last_error, _describe(failure) or "cancelled"
                if not client.stopping:  # the same failure again: not worth another warning
                    log.log(logging.DEBUG if error == self.last_error else logging.WARNING,
                            "MCP server %s: %s", self.server.key, self.last_error)
            self.first_attempt.set()
            if client.stopping:
                break
            if self._up_since is not None and time.monotonic() - self._up_since >= STABLE_S:
                delay = client.backoff_initial_s  # it was up a good while: start the backoff over
            log.info("MCP server %s: reconnecting in %.1f s", self.server.key, delay)
            await self._sleep(delay)
            delay = min(delay * 2, client.backoff_max_s)

    async def _connect_and_watch(self) -> None:
        from mcp import ClientSession
        from mcp.types import Implementation

        from mistralpy.mcp.transports import open_transport

        self._lost = self._refresh = self._ping_now = False
        self._down = asyncio.Event()
        async with AsyncExitStack() as stack:
            read, write = await stack.enter_async_context(open_transport(self.server))
            session = await stack.enter_async_context(ClientSession(
                _WatchedStream(read, self._on_lost), write, message_handler=self._on_message,
                client_info=Implementation(name="mistralpy", version=_version())))
            with anyio.fail_after(self.client.connect_timeout_s):
                init = await session.initialize()
                await self._list_tools(session)
            self.server_info = init.serverInfo.model_dump(exclude_none=True)
            self.session, self.connected, self.last_error = session, True, None
            self.connects += 1
            self._up_since = time.monotonic()
            self.first_attempt.set()
            log.info("MCP server %s connected (%s %s): %d tools", self.server.key, self.server_info.get("name"),
                     self.server_info.get("version"), len(self.tools))
            try:
                await self._watch(session)
            finally:
                # at once: closing the transport may take a while, and a session torn down does
                # not always answer the requests it still has (their waits are cancelled with it)
                self.connected = False
                self._down.set()

    async def _watch(self, session: Any) -> None:
        client = self.client
        while True:
            self._wake.clear()
            if client.stopping:
                return
            if self._lost:
                raise ConnectionError("the connection was lost (the server exited or hung up)")
            if self._refresh:
                self._refresh = False
                with anyio.fail_after(client.connect_timeout_s):
                    await self._list_tools(session)
                log.info("MCP server %s: tool list changed, %d tools", self.server.key, len(self.tools))
            if not self._ping_now:
                # calls in flight: ping often, so a server that died under them fails them soon
                # (an HTTP server's death shows nowhere else: the SDK keeps retrying its GET stream)
                interval = min(client.ping_interval_s, BUSY_PING_INTERVAL_S) if self._inflight else \
                    client.ping_interval_s
                try:
                    await asyncio.wait_for(self._wake.wait(), interval)
                    continue
                except TimeoutError:
                    pass
            self._ping_now = False
            try:
                with anyio.fail_after(client.ping_timeout_s):
                    await session.send_ping()
            except TimeoutError:
                if self._inflight:  # busy (a blocking tool holds up its loop?): its calls have their own timeout
                    log.debug("MCP server %s: no answer to a ping during a call", self.server.key)
                    continue
                raise ConnectionError(f"no answer to a ping in {client.ping_timeout_s:g} s") from None
            except Exception as exc:
                raise ConnectionError(f"ping failed: {_describe(exc)}") from exc

    async def _list_tools(self, session: Any) -> None:
        tools: dict[str, McpTool] = {}
        cursor = None
        while True:
            page = await session.list_tools(cursor=cursor) if cursor else await session.list_tools()
            for tool in page.tools:
                t = McpTool.from_sdk(tool, self.server.prefix, self.server.key)
                if t.name in tools:
                    log.warning("MCP server %s: two tools are both registered as %s; the first is kept",
                                self.server.key, t.name)
                    continue
                tools[t.name] = t
            cursor = page.nextCursor
            if not cursor:
                break
        self.tools = tools

    async def _on_message(self, message: Any) -> None:
        from mcp.types import ServerNotification, ToolListChangedNotification

        if isinstance(message, ServerNotification) and isinstance(message.root, ToolListChangedNotification):
            self._refresh = True
            self._wake.set()
        elif isinstance(message, Exception):  # a transport error (an HTTP stream broke, ...): is it still there?
            log.debug("MCP server %s: transport error: %s", self.server.key, _describe(message))
            self._ping_now = True
            self._wake.set()

    def _on_lost(self) -> None:
        self._lost, self.connected = True, False
        self._down.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        if self.client.stopping:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except TimeoutError:
            pass

    # ---- calls -------------------------------------------------------------------------------
    async def call(self, tool: McpTool, arguments: dict[str, Any], timeout_s: float) -> McpToolResult:
        """One tools/call, raced against the timeout and the end of the connection."""
        from mcp.shared.exceptions import McpError
        from mcp.types import CONNECTION_CLOSED

        session, down = self.session, self._down
        if session is None or not self.connected:
            return self.unavailable()
        call = asyncio.ensure_future(session.call_tool(tool.tool_name, arguments))
        lost = asyncio.ensure_future(down.wait())
        self._inflight += 1
        self._wake.set()  # the watcher switches to its busy ping interval
        try:
            done, _ = await asyncio.wait({call, lost}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._inflight -= 1
            lost.cancel()
            if not call.done():
                call.cancel()  # the SDK drops the request's response stream
        closed = McpToolResult.error(f"MCP server {self.server.key} closed the connection during the call to "
                                     f"{tool.name}")
        if call in done:
            try:
                return McpToolResult.from_sdk(call.result())
            except McpError as exc:
                if exc.error.code == CONNECTION_CLOSED:
                    self._on_lost()
                    return closed
                return McpToolResult.error(f"MCP tool {tool.name} failed: {exc.error.message}")
            except Exception as exc:  # noqa: BLE001 - transport errors, schema validation of the result, ...
                self._ping_now = True
                self._wake.set()
                return McpToolResult.error(f"MCP tool {tool.name} failed: {_describe(exc)}")
        if lost in done:
            return closed
        self._ping_now = True  # a hung call may mean a dead server: check it now
        self._wake.set()
        return McpToolResult.error(f"MCP tool {tool.name} timed out after {timeout_s:g} s")

    def unavailable(self) -> McpToolResult:
        why = self.last_error or "still connecting"
        return McpToolResult.error(f"MCP server {self.server.key} is unavailable ({why}); try again later")


class McpClient:
    """Connects every enabled server of ``config`` and calls their tools.

    ``connect_timeout_s`` bounds start-up + initialize + tools/list of one attempt;
    ``ping_interval_s`` / ``ping_timeout_s`` find servers that stopped answering; reconnections
    wait ``backoff_initial_s``, doubling up to ``backoff_max_s``.
    """

    def __init__(self, config: McpClientConfig, *, connect_timeout_s: float = 60.0, ping_interval_s: float = 15.0,
                 ping_timeout_s: float = 10.0, backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0) -> None:
        self.config = config
        self.connect_timeout_s, self.ping_interval_s, self.ping_timeout_s = connect_timeout_s, ping_interval_s, \
            ping_timeout_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.stopping = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._connections: list[_Connection] = []
        self._warned: set[str] = set()

    # ---- start / stop ------------------------------------------------------------------------
    def start(self, wait_s: float | None = None) -> Self:
        """Start the loop thread and every server's task; wait (at most ``wait_s``, default the
        connect timeout) until each server connected or failed once, so its tools are listed."""
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=main, name="mistralpy-mcp", daemon=True)
        self._thread.start()
        ready.wait()
        self._submit(self._start_tasks()).result()
        atexit.register(self.close)
        wait = self.connect_timeout_s + 5 if wait_s is None else wait_s
        try:
            self._submit(self._wait_first(wait)).result(wait + 5)
        except TimeoutError:
            pass
        for conn in self._connections:
            if not conn.connected:
                log.warning("MCP server %s is not connected yet (%s); its tools are added once it is",
                            conn.server.key, conn.last_error or "starting")
        return self

    async def _start_tasks(self) -> None:
        self._semaphore = asyncio.Semaphore(self.config.max_concurrent_calls)
        for server in self.config.enabled_servers:
            conn = _Connection(server, self)
            conn.task = asyncio.create_task(conn.run(), name=f"mcp:{server.key}")
            self._connections.append(conn)

    async def _wait_first(self, timeout_s: float) -> None:
        waits = [asyncio.create_task(c.first_attempt.wait()) for c in self._connections]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=timeout_s)
            for w in pending:
                w.cancel()

    def close(self, timeout_s: float = 10.0) -> None:
        """End every connection (child processes are stopped) and the loop thread. Idempotent."""
        if self._closed or self._loop is None:
            self._closed = True
            return
        if threading.current_thread() is self._thread:
            raise RuntimeError("McpClient.close cannot run on the client's own loop: await aclose()")
        self._closed = True
        atexit.unregister(self.close)
        loop = self._loop
        try:
            self._submit(self._stop_tasks(timeout_s)).result(timeout_s + 5)
        except Exception as exc:  # noqa: BLE001 - closing must not raise
            log.warning("MCP client: unclean shutdown: %s", _describe(exc))
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if not loop.is_running():
            loop.close()

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """close() for async code (a server's shutdown hook), without blocking its event loop."""
        await asyncio.to_thread(self.close, timeout_s)

    async def _stop_tasks(self, timeout_s: float) -> None:
        self.stopping = True
        for conn in self._connections:
            conn.wake()
        tasks = [c.task for c in self._connections if c.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        for task in pending:  # a transport that would not close: cancel it
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=3)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- tools -------------------------------------------------------------------------------
    def _table(self) -> dict[str, tuple[McpTool, _Connection]]:
        """Registered name -> (tool, connection); on a clash the server listed first keeps it."""
        table: dict[str, tuple[McpTool, _Connection]] = {}
        for conn in list(self._connections):
            for name, tool in conn.tools.items():
                if name in table:
                    if name not in self._warned:
                        self._warned.add(name)
                        log.warning("MCP tool %s of server %s clashes with server %s's; set a tool_prefix",
                                    name, conn.server.key, table[name][1].server.key)
                    continue
                table[name] = (tool, conn)
        return table

    def tools(self, include_unavailable: bool = False) -> list[McpTool]:
        return [t for t, c in self._table().values() if include_unavailable or c.connected]

    def tool_definitions(self) -> list[dict[str, Any]]:
        """OpenAI tool definitions of every available tool (strict, whole input schemas)."""
        return [t.definition() for t in self.tools()]

    def has_tool(self, name: str) -> bool:
        return name in self._table()

    def status(self) -> list[dict[str, Any]]:
        """Per server: key, name, connected, tool count, successful connections, last error."""
        return [{"id": c.server.key, "name": c.server.name, "connected": c.connected, "tools": len(c.tools),
                 "connects": c.connects, "last_error": c.last_error, "server_info": dict(c.server_info)}
                for c in self._connections]

    @property
    def servers_connected(self) -> int:
        return sum(c.connected for c in self._connections)

    # ---- calls -------------------------------------------------------------------------------
    async def call_tool(self, name: str, arguments: Any = None, *, timeout_s: float | None = None) -> McpToolResult:
        """Call a registered tool (``arguments``: a dict or JSON text). Never raises for the
        tool's or the server's failures: they come back as an error result."""
        if self._closed:
            return _closed_result()
        return await self._run_async(self._call(name, arguments, timeout_s))

    def call_tool_sync(self, name: str, arguments: Any = None, *, timeout_s: float | None = None) -> McpToolResult:
        if self._closed:
            return _closed_result()
        return self._run_sync(self._call(name, arguments, timeout_s))

    def call_tools_sync(self, calls: Sequence[tuple[str, Any]]) -> list[McpToolResult]:
        """Several calls at once (one model round's), results in order."""
        async def many() -> list[McpToolResult]:
            return list(await asyncio.gather(*(self._call(n, a, None) for n, a in calls)))

        if self._closed:
            return [_closed_result() for _ in calls]
        return self._run_sync(many()) if calls else []

    async def _call(self, name: str, arguments: Any, timeout_s: float | None) -> McpToolResult:
        if self.stopping:
            return _closed_result()
        entry = self._table().get(name)
        if entry is None:
            return McpToolResult.error(f"unknown MCP tool {name!r}")
        tool, conn = entry
        if not conn.connected:
            return conn.unavailable()
        try:
            args = tool.validate_arguments(arguments)
        except ValueError as exc:
            return McpToolResult.error(f"invalid arguments for {name}: {exc}")
        assert self._semaphore is not None
        async with self._semaphore:
            result = await conn.call(tool, args, timeout_s or self.config.tool_timeout_secs)
        if result.is_error:
            log.info("MCP tool %s: error result: %s", name, result.text()[:200])
        return result

    # ---- resources ----------------------------------------------------------------------------
    async def list_resources(self) -> list[dict[str, Any]]:
        """Resources of the connected servers (``uri``, ``name``, ``mime_type``, ``server``),
        limited to each server's ``resources`` URI patterns when it has some."""
        return await self._run_async(self._list_resources())

    async def _list_resources(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for conn in self._connections:
            if not conn.connected or conn.session is None:
                continue
            try:
                with anyio.fail_after(self.config.tool_timeout_secs):
                    listed = await conn.session.list_resources()
            except Exception as exc:  # noqa: BLE001 - a server without resources, or failing
                log.debug("MCP server %s: resources/list failed: %s", conn.server.key, _describe(exc))
                continue
            for res in listed.resources:
                uri = str(res.uri)
                if _allowed(conn.server, uri):
                    out.append({"server": conn.server.key, "uri": uri, "name": res.name, "mime_type": res.mimeType,
                                "description": res.description})
        return out

    async def read_resource(self, uri: str, server: str | None = None) -> list[dict[str, Any]]:
        """The contents of a resource (``{"uri", "mime_type", "text" | "blob"}`` each)."""
        return await self._run_async(self._read_resource(uri, server))

    async def _read_resource(self, uri: str, server: str | None) -> list[dict[str, Any]]:
        from pydantic import AnyUrl

        conns = [c for c in self._connections if c.connected and (server is None or c.server.key == server)
                 and _allowed(c.server, uri)]
        errors = []
        for conn in conns:
            try:
                with anyio.fail_after(self.config.tool_timeout_secs):
                    read = await conn.session.read_resource(AnyUrl(uri))
            except Exception as exc:  # noqa: BLE001 - try the next server
                errors.append(f"{conn.server.key}: {_describe(exc)}")
                continue
            return [{"uri": str(c.uri), "mime_type": c.mimeType,
                     **({"text": c.text} if hasattr(c, "text") else {"blob": c.blob})} for c in read.contents]
        raise LookupError(f"no connected MCP server could read {uri!r}" + (f" ({'; '.join(errors)})" if errors else ""))

    # ---- threads and loops ----------------------------------------------------------------------
    def _submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the MCP client is not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _run_async(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            return await coro
        return await asyncio.wrap_future(self._submit(coro))

    def _run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("call_tool_sync cannot run on the MCP client's own thread: await call_tool")
        return self._submit(coro).result()


def _closed_result() -> McpToolResult:
    return McpToolResult.error("the MCP client is shut down")


def _allowed(server: McpServerConfig, uri: str) -> bool:
    return not server.resources or any(fnmatch.fnmatchcase(uri, pattern) for pattern in server.resources)


def _version() -> str:
    from mistralpy import __version__

    return __version__
