"""The core of every tool loop: which tools run here, running one round's calls, and carrying the
conversation into the next round. Used by the Python API (engine/tool_loop.py, ``Engine.chat``) and
the server (server/tool_loop.py, ``POST /v1/chat/completions``), so both behave the same.

Server-side tools come from *providers* (:class:`ToolProvider`): Python ``tool_callbacks``, the
MCP client, a ``tool_dispatch_url`` (engine/tool_dispatch.py) and the search tools
(mistralpy/search). :class:`ServerTools` is an engine's set of them; :class:`Rounds` is one
request's loop state. Everything that calls a tool is a coroutine (MCP calls and HTTP requests
must not block an event loop); the synchronous Python API runs them with :func:`run_sync`.

Semantics, one round at a time: an answer without calls (or in the last allowed round) ends the
loop. A round whose calls all run here executes them (concurrently), appends the assistant turn
and one ``tool`` message per call, and generation continues; ``tool_choice`` forcing is dropped
after the first round. A round mixing server-side and client-side calls runs the server-side ones
(recorded in ``agentic_tool_calls``) and ends, returning only the client-side calls as
``tool_calls``: the caller runs those. A failing tool gives the model an ``error: ...`` result.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from mistralpy.mcp import McpClient

log = logging.getLogger(__name__)
T = TypeVar("T")

# web_search_options.search_context_size -> token budget of one search / fetch_url result
CONTEXT_BUDGETS = {"low": 1024, "medium": 2048, "high": 4096}


@dataclass(slots=True)
class ToolContext:
    """What a tool call may need of its request."""

    vision: bool = False                      # the model takes images (MCP image results as parts)
    policy: Any = None                        # multimodal.fetch.MediaPolicy for fetch_url (None: strict default)
    search_context_size: str = "medium"       # web_search_options
    count_tokens: Callable[[str], int] | None = None  # the model's tokenizer, for result budgets

    @property
    def token_budget(self) -> int:
        return CONTEXT_BUDGETS.get(self.search_context_size, CONTEXT_BUDGETS["medium"])


@dataclass(slots=True)
class ToolOutcome:
    """One executed call: the ``tool`` message content, its text for ``agentic_tool_calls``,
    and extra fields for that entry (``mcp``: the whole MCP result)."""

    content: str | list[dict[str, Any]]
    text: str
    is_error: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def error(cls, message: str) -> ToolOutcome:
        return cls(f"error: {message}", f"error: {message}", True)


class ToolProvider(Protocol):
    def definitions(self) -> list[dict[str, Any]]: ...   # offered to the model
    def has(self, name: str) -> bool: ...                 # calls to this name run here
    async def call(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome: ...


def parse_arguments(name: str, arguments: Any) -> dict[str, Any]:
    """A call's arguments (JSON text or a dict) as a dict; ValueError naming the problem."""
    if isinstance(arguments, dict):
        return arguments
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError as exc:
        raise ValueError(f"invalid arguments for {name}: {exc}") from None
    if not isinstance(args, dict):
        raise ValueError(f"invalid arguments for {name}: arguments are not a JSON object")  # noqa: TRY004
    return args


def result_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


class CallbackTools:
    """Python ``tool_callbacks`` (name -> callable taking the arguments as keywords; may be async).
    Plain callables may block: each runs on a worker thread, one at a time, in call order."""

    def __init__(self, callbacks: dict[str, Callable[..., Any]]) -> None:
        self.callbacks = callbacks
        self._locks: dict[int, asyncio.Lock] = {}  # per event loop (the sync API runs one per round)

    def definitions(self) -> list[dict[str, Any]]:
        return []  # the caller's `tools` define them

    def has(self, name: str) -> bool:
        return name in self.callbacks

    async def call(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome:
        try:
            args = parse_arguments(name, arguments)
        except ValueError as exc:
            return ToolOutcome.error(str(exc))
        lock = self._locks.setdefault(id(asyncio.get_running_loop()), asyncio.Lock())
        fn = self.callbacks[name]
        try:
            async with lock:
                if inspect.iscoroutinefunction(fn):
                    result = await fn(**args)
                else:
                    result = await asyncio.to_thread(fn, **args)
        except Exception as exc:  # noqa: BLE001 - the model is told, and may try again
            log.warning("tool %s raised %s: %s", name, type(exc).__name__, exc)
            return ToolOutcome.error(f"{type(exc).__name__}: {exc}")
        text = result_text(result)
        return ToolOutcome(text, text)


class McpTools:
    """The MCP client's tools (their definitions only with ``auto_register_tools``)."""

    def __init__(self, client: McpClient) -> None:
        self.client = client

    def definitions(self) -> list[dict[str, Any]]:
        return self.client.tool_definitions() if self.client.config.auto_register_tools else []

    def has(self, name: str) -> bool:
        return self.client.has_tool(name)

    async def call(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome:
        res = await self.client.call_tool(name, arguments)  # never raises: errors are results
        return ToolOutcome(res.message_content(vision=ctx.vision), res.text(vision=False), res.is_error,
                           {"mcp": res.to_dict()})


class ServerTools:
    """An engine's server-side tool providers, in priority order (the first one naming a tool
    runs it). Empty when the engine has none: requests then run without a tool loop."""

    def __init__(self, providers: Sequence[ToolProvider] = ()) -> None:
        self.providers = list(providers)

    def __bool__(self) -> bool:
        return bool(self.providers)

    def with_callbacks(self, callbacks: dict[str, Callable[..., Any]] | None) -> ServerTools:
        """This set with a request's Python callbacks first."""
        return ServerTools([CallbackTools(callbacks), *self.providers]) if callbacks else self

    @property
    def mcp(self) -> McpClient | None:
        return next((p.client for p in self.providers if isinstance(p, McpTools)), None)

    def definitions(self) -> list[dict[str, Any]]:
        out, seen = [], set()
        for p in self.providers:
            for d in p.definitions():
                name = d["function"]["name"]
                if name not in seen:
                    seen.add(name)
                    out.append(d)
        return out

    def provider(self, name: str) -> ToolProvider | None:
        return next((p for p in self.providers if p.has(name)), None)

    async def call(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome:
        provider = self.provider(name)
        if provider is None:
            return ToolOutcome.error(f"unknown tool {name!r}")
        try:
            return await provider.call(name, arguments, ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a provider bug must not end the request (logged)
            log.exception("server-side tool %s failed", name)
            return ToolOutcome.error(f"{type(exc).__name__}: {exc}")


def merge_tools(tools: list[dict[str, Any]] | None, extra: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The request's tools plus the server's it does not define itself (the request's win)."""
    tools = list(tools or [])
    taken = {t.get("function", {}).get("name") for t in tools if isinstance(t, dict)}
    merged = tools + [t for t in extra if t["function"]["name"] not in taken]
    return merged or None


# Progress callback of Rounds.execute: ("started" | "completed", agentic_tool_calls entry, index)
OnProgress = Callable[[str, dict[str, Any], int], Awaitable[None] | None]


class Rounds:
    """One request's tool loop state: the conversation, the chat options of the next round, the
    executed calls (``agentic_tool_calls``) and the round number."""

    def __init__(self, messages: Sequence[dict[str, Any]], chat: dict[str, Any], tools: ServerTools,
                 max_rounds: int, *, client_names: frozenset[str] = frozenset()) -> None:
        self.messages = list(messages)
        self.chat = dict(chat)
        self.tools = tools
        self.max_rounds = max_rounds
        # tools the client defined and runs itself: a server tool of the same name is shadowed
        self.client_names = client_names
        self.chat["tools"] = merge_tools(chat.get("tools"), tools.definitions())
        self.executed: list[dict[str, Any]] = []
        self.round = 0

    def server_side(self, name: str) -> bool:
        return name not in self.client_names and self.tools.provider(name) is not None

    def split(self, calls: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(calls to run here, calls for the client); nothing runs here in the last round."""
        if self.round >= self.max_rounds:
            return [], list(calls)
        here = [c for c in calls if self.server_side(c["function"]["name"])]
        return here, [c for c in calls if not self.server_side(c["function"]["name"])]

    async def execute(self, calls: Sequence[dict[str, Any]], ctx: ToolContext,
                      on_progress: OnProgress | None = None) -> list[ToolOutcome]:
        """Run calls concurrently; each is recorded in ``executed`` (in call order)."""
        entries = [{"round": self.round, "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                   for c in calls]

        async def one(i: int) -> ToolOutcome:
            await _notify(on_progress, "started", entries[i], i)
            out = await self.tools.call(entries[i]["name"], entries[i]["arguments"], ctx)
            entries[i].update(result=out.text, is_error=out.is_error, **out.extra)
            await _notify(on_progress, "completed", entries[i], i)
            return out

        outcomes = list(await asyncio.gather(*(one(i) for i in range(len(calls)))))
        self.executed.extend(entries)
        return outcomes

    def extend(self, message: dict[str, Any], calls: Sequence[dict[str, Any]], outcomes: Sequence[ToolOutcome]) -> None:
        """Append the assistant turn and its tool results; the next round is no longer forced."""
        turn = plain({k: v for k, v in dict(message).items() if k != "reasoning_content"})  # templates
        turn["tool_calls"] = plain(list(calls))                                              # re-render it
        self.messages.append(turn)
        for call, out in zip(calls, outcomes):
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                                  "content": out.content})
        if self.chat.get("tool_choice") not in (None, "auto", "none"):
            self.chat["tool_choice"] = "auto"  # a forced call is asked for once, not every round
        self.round += 1


async def _notify(cb: OnProgress | None, kind: str, entry: dict[str, Any], index: int) -> None:
    if cb is not None:
        res = cb(kind, dict(entry), index)
        if inspect.isawaitable(res):
            await res


def accumulate(delta: dict[str, Any], content: list[str], calls: dict[int, dict[str, Any]]) -> None:
    """Fold one streamed delta into a round's content and tool calls."""
    if delta.get("content"):
        content.append(delta["content"])
    for part in delta.get("tool_calls") or []:
        call = calls.setdefault(part["index"], {"id": None, "type": "function",
                                                "function": {"name": "", "arguments": ""}})
        if part.get("id"):
            call["id"] = part["id"]
        fn = part.get("function") or {}
        if fn.get("name"):
            call["function"]["name"] = fn["name"]
        call["function"]["arguments"] += fn.get("arguments") or ""


_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
_TIMES = ("total_time_sec", "total_prompt_time_sec", "total_completion_time_sec")


def sum_usage(usages: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``usage`` over every round: counts and times summed, rates recomputed."""
    if not usages:
        return {}
    out = json.loads(json.dumps(usages[-1], default=str))
    for key in _COUNTS + _TIMES:
        if key in out:
            out[key] = sum(u.get(key, 0) for u in usages)
    if "prompt_tokens_details" in out:
        out["prompt_tokens_details"] = {"cached_tokens": sum(
            (u.get("prompt_tokens_details") or {}).get("cached_tokens", 0) for u in usages)}

    def rate(n: int, s: float) -> float:
        return n / s if s > 0 else 0.0

    if "total_time_sec" in out:
        p, c, t = out["total_prompt_time_sec"], out["total_completion_time_sec"], out["total_time_sec"]
        out.update(avg_tok_per_sec=rate(out["total_tokens"], t), avg_prompt_tok_per_sec=rate(out["prompt_tokens"], p),
                   avg_compl_tok_per_sec=rate(out["completion_tokens"], c))
    out.pop("completion_tok_per_sec", None)
    return out


def plain(value: Any) -> Any:
    """Plain dicts and lists (OpenAIObject unwrapped) for templates and JSON."""
    return json.loads(json.dumps(value, default=str))


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from synchronous code (the Python API). Where this thread
    already runs an event loop (a notebook), it runs on a helper thread instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mistralpy-tools") as pool:
        return pool.submit(asyncio.run, coro).result()
