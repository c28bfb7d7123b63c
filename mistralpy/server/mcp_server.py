"""MCP server: the served models as Model Context Protocol tools over streamable HTTP at ``/mcp``.

    mistralpy serve -m MODEL --mcp-port 4321      # /mcp on port 4321 and on the main port

Tools: ``chat`` (any chat-completion field; the answer as text content, reasoning and tool calls as
further text blocks, the whole ``chat.completion`` as structured content), ``complete`` (a raw text
completion) and ``list_models``. Built on the official SDK (1.x, see mistralpy/mcp/__init__.py): its
low-level ``Server`` answers the JSON-RPC methods and its ``StreamableHTTPSessionManager`` speaks the
transport (sessions, SSE responses, 202 for notifications). The tools run the HTTP routes' own
handlers (server/chat.py, completions.py), so both APIs share validation, prompts, metrics and any
later change there. Errors: schema or value errors and engine failures come back as tool results
with ``isError`` (so a calling model can correct itself); an unknown tool is a JSON-RPC -32602 error.
Authentication is the app's ``ApiKeyMiddleware`` (``/mcp`` is no public path); browsers' Origin is
checked against ``--cors-origins`` as the spec asks (against DNS rebinding).
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import anyio
from fastapi import Request
from mcp import types
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import McpError
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from mistralpy.server import chat, completions
from mistralpy.server.errors import error_body, to_api_error
from mistralpy.server.protocol import ChatCompletionRequest, CompletionRequest
from mistralpy.server.state import ServerState

MCP_PATH = "/mcp"
# Headers a browser client must be able to read (CORS) to keep its session.
MCP_EXPOSE_HEADERS = ("mcp-session-id", "mcp-protocol-version")
_PART = "mistralpy/part"  # _meta key naming what a text block holds: answer, reasoning, tool_calls

# Fields the tools do not take: one tool call gives one result, there is no token stream.
_NO_STREAM = {"stream", "stream_options"}
_DESCRIPTIONS = {
    "messages": "the conversation, OpenAI chat format: [{\"role\": \"user\", \"content\": \"...\"}, ...]",
    "max_tokens": "most tokens to generate",
    "temperature": "sampling temperature; 0 = greedy (default: the model's generation_config)",
    "tools": "OpenAI function tools the model may call; calls come back in the answer, not executed",
    "tool_choice": "\"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
    "prompt": "the text to continue (or token ids, or a list of either)",
}


# ---- input schemas ----------------------------------------------------------------------------
def _inline_refs(node: Any, defs: dict[str, Any], depth: int = 0) -> Any:
    """Replace ``{"$ref": "#/$defs/X"}`` by X: some MCP clients cannot follow references."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/") and depth < 8:
            return _inline_refs(copy.deepcopy(defs[ref.split("/")[-1]]), defs, depth + 1)
        # (titles are noise to a model; "x-" keys are this project's OpenAPI markers)
        return {k: _inline_refs(v, defs, depth) for k, v in node.items() if k != "title" and not k.startswith("x-")}
    if isinstance(node, list):
        return [_inline_refs(v, defs, depth) for v in node]
    return node


def request_schema(model: type[BaseModel], model_names: list[str], default: str | None) -> dict[str, Any]:
    """A tool's input schema from the HTTP route's request model, so every field the route takes
    (including ones added later) is accepted, and nothing else (a misspelt field is an error)."""
    raw = model.model_json_schema()
    schema = _inline_refs({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    props: dict[str, Any] = {k: v for k, v in schema.get("properties", {}).items() if k not in _NO_STREAM}
    for name, text in _DESCRIPTIONS.items():
        if name in props and "description" not in props[name]:
            if name == "max_tokens":
                default = props[name].get("default")
                text += f" (default: {default})" if default is not None else " (default: up to the context length)"
            props[name] = {**props[name], "description": text}
    if "model" in props:
        props["model"] = {**props["model"], "description": f"served model: one of {model_names} "
                                                           f"(default: {default})"}
    return {"type": "object", "properties": props, "required": schema.get("required", []),
            "additionalProperties": False}


# ---- running the HTTP routes --------------------------------------------------------------------
async def _never_disconnects() -> Message:
    # until_disconnect() watches receive() for the client going away; an MCP call is cancelled by
    # the SDK (notifications/cancelled, session end) instead, which cancels the route's await.
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable")


async def run_route(state: ServerState, route: Callable[[Any, Request], Awaitable[Any]], body: BaseModel,
                    path: str) -> dict[str, Any]:
    """Call a route handler as if FastAPI had (only ``request.app.state.server`` and ``receive`` are
    used by them); the JSON body it answers."""
    scope: Scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "headers": [],
                    "query_string": b"", "app": SimpleNamespace(state=SimpleNamespace(server=state)), "state": {}}
    response = await route(body, Request(scope, _never_disconnects))
    if isinstance(response, Response):
        return json.loads(bytes(response.body))
    return dict(response)


def _text(text: str, part: str) -> types.TextContent:
    return types.TextContent(type="text", text=text, _meta={_PART: part})


def _error_result(status: int, message: str, extra: dict[str, Any] | None = None) -> types.CallToolResult:
    body = error_body(status, message)
    if extra:
        body.update(extra)
    return types.CallToolResult(content=[types.TextContent(type="text", text=f"error {status}: {message}")],
                                structuredContent=body, isError=True)


def _invalid_arguments(exc: ValidationError) -> types.CallToolResult:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'arguments'}: {e['msg']}" for e in exc.errors()]
    return _error_result(400, "invalid arguments: " + "; ".join(parts))


def chat_content(result: dict[str, Any]) -> list[types.ContentBlock]:
    """Text blocks of a chat.completion: per choice its answer (always, first), then its reasoning
    and its tool calls when it has them; ``_meta["mistralpy/part"]`` says which is which."""
    choices = result.get("choices", [])
    blocks: list[types.ContentBlock] = []
    for choice in choices:
        msg = choice.get("message") or {}
        label = f"[choice {choice.get('index', 0)}] " if len(choices) > 1 else ""
        blocks.append(_text(label + (msg.get("content") or ""), "answer"))
        if msg.get("reasoning_content"):
            blocks.append(_text(f"{label}Reasoning:\n{msg['reasoning_content']}", "reasoning"))
        if msg.get("tool_calls"):
            calls = [{"id": c.get("id"), "name": c.get("function", {}).get("name"),
                      "arguments": c.get("function", {}).get("arguments")} for c in msg["tool_calls"]]
            blocks.append(_text(f"{label}Tool calls:\n{json.dumps(calls, ensure_ascii=False)}", "tool_calls"))
    return blocks


# ---- the SDK server -------------------------------------------------------------------------------
class ModelTools:
    """The three tools on one ServerState, registered on an SDK low-level Server."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.server: Server[Any, Any] = Server("mistralpy", instructions=(
            "Text generation with the models this mistral.py server serves: 'chat' (OpenAI chat "
            "completion fields), 'complete' (raw text continuation), 'list_models'."))
        self.server.list_tools()(self.list_tools)
        self.server.call_tool()(self.call_tool)  # validates arguments against inputSchema first
        sdk_handler = self.server.request_handlers[types.CallToolRequest]

        async def call_known_tool(req: types.CallToolRequest) -> types.ServerResult:
            # The SDK turns every exception of a tool into an isError result; an unknown tool is
            # a protocol error instead (spec: "Unknown tools" -> -32602).
            if req.params.name not in self.tool_names:
                raise McpError(types.ErrorData(code=types.INVALID_PARAMS, message=f"Unknown tool: {req.params.name}"))
            return await sdk_handler(req)

        self.server.request_handlers[types.CallToolRequest] = call_known_tool

    tool_names = frozenset({"chat", "complete", "list_models"})

    async def list_tools(self) -> list[types.Tool]:
        registry = self.state.registry
        names, default = list(registry.entries), registry.default_name
        # (chat claims nothing: with server-side tools registered, a chat may call out and act)
        read_only = types.ToolAnnotations(readOnlyHint=True, openWorldHint=False)
        return [
            types.Tool(name="chat", title="Chat completion",
                       description="Run a chat completion (the fields of OpenAI's /v1/chat/completions, e.g. "
                                   "messages, model, max_tokens, temperature, tools, tool_choice). Returns the "
                                   "assistant's answer as text (reasoning and tool calls as further text blocks) "
                                   "and the whole chat.completion as structured content.",
                       inputSchema=request_schema(ChatCompletionRequest, names, default)),
            types.Tool(name="complete", title="Text completion",
                       annotations=types.ToolAnnotations(readOnlyHint=True, openWorldHint=False),
                       description="Continue a raw prompt (the fields of OpenAI's /v1/completions: prompt, "
                                   "max_tokens, temperature, stop, ...). Returns the generated text and the "
                                   "whole text_completion as structured content.",
                       inputSchema=request_schema(CompletionRequest, names, default)),
            types.Tool(name="list_models", title="List models", annotations=read_only,
                       description="The models this server serves: id, loaded or not, the default one, "
                                   "context length.",
                       inputSchema={"type": "object", "properties": {}, "additionalProperties": False}),
        ]

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        if name == "list_models":
            return self.list_models()
        request_model, route, path = ((ChatCompletionRequest, chat.chat_completions, "/v1/chat/completions")
                                      if name == "chat" else
                                      (CompletionRequest, completions.completions, "/v1/completions"))
        try:
            body = request_model.model_validate({**arguments, "stream": False})
        except ValidationError as exc:
            return _invalid_arguments(exc)
        try:
            result = await run_route(self.state, route, body, path)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a tool error result
            err = to_api_error(exc)
            return _error_result(err.status, err.message, err.extra)
        if name == "chat":
            return chat_content(result), result
        texts = [_text(c.get("text", ""), "answer") for c in result.get("choices", [])]
        return texts, result

    def list_models(self) -> tuple[list[types.ContentBlock], dict[str, Any]]:
        registry = self.state.registry
        data = [{"id": e.served_name, "object": "model", "status": "loaded" if e.loaded else "unloaded",
                 "default": e.served_name == registry.default_name,
                 "max_model_len": e.engine.max_total_tokens if e.engine else None}
                for e in registry.entries.values()]
        lines = [f"{m['id']} ({m['status']}{', default' if m['default'] else ''}"
                 f"{', max_model_len ' + str(m['max_model_len']) if m['max_model_len'] else ''})" for m in data]
        return [_text("\n".join(lines), "answer")], {"object": "list", "data": data}


# ---- the ASGI endpoint ------------------------------------------------------------------------------
class _QuietSessionEnd(logging.Filter):
    """SDK 1.30 logs a traceback at ERROR whenever a client ends its session (DELETE) while its GET
    stream is open: terminate() closes the stream under the writer. Benign, and it happens on every
    normal client exit, so that one record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, anyio.ClosedResourceError)
                    and record.getMessage().startswith("Error in standalone SSE writer"))


_SDK_TRANSPORT_LOG = logging.getLogger("mcp.server.streamable_http")
if not any(isinstance(f, _QuietSessionEnd) for f in _SDK_TRANSPORT_LOG.filters):
    _SDK_TRANSPORT_LOG.addFilter(_QuietSessionEnd())


class McpEndpoint:
    """ASGI app of ``/mcp``: the SDK's session manager, which must run (``run()``) inside the lifespan
    of the app that serves it."""

    def __init__(self, state: ServerState) -> None:
        self.tools = ModelTools(state)
        options = state.options
        self.allowed_origins = frozenset(getattr(options, "cors_origins", ()) or ())
        self.max_body = getattr(options, "max_body_bytes", None) or 4 * 2**20
        self.manager: StreamableHTTPSessionManager | None = None

    @property
    def running(self) -> bool:
        return self.manager is not None

    @contextlib.asynccontextmanager
    async def run(self) -> AsyncIterator[None]:
        # A manager runs once only: a fresh one per lifespan, so an app can be started again.
        manager = StreamableHTTPSessionManager(self.tools.server, max_request_body_size=self.max_body)
        async with manager.run():
            self.manager = manager
            try:
                yield
            finally:
                self.manager = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        manager = self.manager
        if manager is None:  # e.g. an app used without its lifespan
            return await _plain(send, 503, "the MCP session manager is not running")
        origin = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"origin"), None)
        # Spec: servers MUST validate Origin (DNS rebinding). Non-browser clients send none.
        if origin is not None and "*" not in self.allowed_origins and origin not in self.allowed_origins:
            return await _plain(send, 403, f"origin {origin!r} not allowed (see --cors-origins)")
        if scope.get("method") == "POST":
            body = await _read_body(receive, self.max_body)
            if body is None:
                return await _plain(send, 413, f"request body larger than {self.max_body} bytes")
            unknown = _unknown_method_error(body)
            if unknown is not None:
                return await _json(send, 200, unknown)
            receive = _replay(body, receive)
        await manager.handle_request(scope, receive, send)


# The SDK 1.x answers a request for a method it does not know with -32602 "Invalid request
# parameters" (its request union fails to validate); JSON-RPC says -32601 "Method not found".
_CLIENT_METHODS = frozenset(
    typing.get_args(cls.model_fields["method"].annotation)[0]
    for cls in typing.get_args(types.ClientRequest.model_fields["root"].annotation))


def _unknown_method_error(body: bytes) -> dict[str, Any] | None:
    try:
        msg = json.loads(body)
    except ValueError:
        return None  # the SDK answers a parse error
    if (isinstance(msg, dict) and "id" in msg and isinstance(msg.get("method"), str)
            and msg["method"] not in _CLIENT_METHODS):
        return {"jsonrpc": "2.0", "id": msg["id"],
                "error": {"code": types.METHOD_NOT_FOUND, "message": f"Method not found: {msg['method']}"}}
    return None


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None past ``limit`` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # then the real stream: http.disconnect

    return replay


async def _plain(send: Send, status: int, message: str) -> None:
    await _json(send, status, error_body(status, message))


async def _json(send: Send, status: int, obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def mcp_routes(endpoint: McpEndpoint) -> list[Route]:
    # Routes with the endpoint as a plain ASGI app (every method), at /mcp and /mcp/: a Mount would
    # answer /mcp with a 307 redirect to /mcp/, which POSTing clients handle badly.
    return [Route(MCP_PATH, endpoint, include_in_schema=False),
            Route(MCP_PATH + "/", endpoint, include_in_schema=False)]


def create_mcp_app(state: ServerState) -> Starlette:
    """The MCP endpoint alone, for its own port (``--mcp-port``), with the main app's API key, CORS
    and request id handling. It shares the main app's models; the main app owns them."""
    from mistralpy.server.middleware import ApiKeyMiddleware, RequestIdMiddleware

    endpoint = McpEndpoint(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with endpoint.run():
            yield

    options = state.options
    middleware = [Middleware(RequestIdMiddleware)]
    if getattr(options, "cors_origins", ()):
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=["x-request-id", *MCP_EXPOSE_HEADERS]))
    if getattr(options, "api_key", None):
        middleware.append(Middleware(ApiKeyMiddleware, api_key=options.api_key))
    app = Starlette(routes=mcp_routes(endpoint), middleware=middleware, lifespan=lifespan)
    app.state.server = state
    app.state.mcp = endpoint
    return app
