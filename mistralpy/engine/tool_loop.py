"""Server-side tools for the Python API (mistral.rs's ``tool_callbacks``).

``Engine.chat(..., tool_callbacks={"name": fn})``: after each round whose answer calls tools, every
call whose name has a callback runs here (``fn(**arguments)``); the assistant's calls and the
results (``tool`` messages) are appended to the conversation and the model continues, until an
answer calls no tool, calls a tool without a callback (returned to the caller as usual), or
``max_tool_rounds`` rounds ran. A tool that raises, or arguments that are not a JSON object, give
the model an ``error: ...`` result instead, so it can recover; the engine never dies of a tool.

MCP tools (``Engine(mcp_config=...)``, mistralpy/mcp) run the same way: with
``auto_register_tools`` their definitions are added to the request's ``tools`` (a tool the
caller defined under the same name keeps the caller's definition), and a call to any name the MCP
client knows (and no callback claims) goes to its server; one round's MCP calls run concurrently.
A vision model gets an MCP image result as image parts of the ``tool`` message. The final
response lists every executed call in ``agentic_tool_calls`` ([{round, name, arguments, result}]).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mistralpy.engine.outputs import OpenAIObject
from mistralpy.errors import InvalidRequestError
from mistralpy.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mistralpy.engine.llm_engine import Engine
    from mistralpy.mcp import McpClient

log = logging.getLogger(__name__)


class ToolLoop:
    def __init__(self, engine: Engine, messages: Sequence[dict[str, Any]], params: SamplingParams,
                 chat: dict[str, Any], callbacks: dict[str, Callable[..., Any]], max_rounds: int,
                 mcp: McpClient | None = None) -> None:
        if not isinstance(callbacks, dict) or not all(callable(f) for f in callbacks.values()):
            raise InvalidRequestError("tool_callbacks must map tool names to callables", "tool_callbacks")
        if not isinstance(max_rounds, int) or max_rounds < 1:
            raise InvalidRequestError("max_tool_rounds must be an integer >= 1", "max_tool_rounds")
        if params.n != 1:
            raise InvalidRequestError("tool_callbacks need n = 1 (one conversation to continue)", "n")
        self.engine = engine
        self.messages = list(messages)
        self.params = params
        self.chat = dict(chat)
        self.callbacks = callbacks
        self.max_rounds = max_rounds
        self.mcp = mcp
        if mcp is not None and mcp.config.auto_register_tools:
            self.chat["tools"] = _with_mcp_tools(chat.get("tools"), mcp.tool_definitions())
        if callbacks and not self.chat.get("tools"):
            raise InvalidRequestError("tool_callbacks need tools (their definitions for the model)", "tools")
        self.executed: list[dict[str, Any]] = []  # agentic_tool_calls
        self.round = 0

    def run(self) -> OpenAIObject:
        """The final chat.completion, with ``usage`` summed over every round."""
        totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for round_no in range(self.max_rounds + 1):
            self.round = round_no
            result = self.engine._chat_once(self.messages, self.params, self.chat, False, None)
            for key in totals:
                totals[key] += result["usage"][key]
            message = dict(result["choices"][0]["message"])
            calls = message.get("tool_calls") or []
            if round_no == self.max_rounds or not self._continue(message, calls):
                break
        result["usage"] = {**result["usage"], **totals}
        result["tool_rounds"] = round_no
        if self.mcp is not None or self.executed:
            result["agentic_tool_calls"] = self.executed
        return result

    def stream(self, stream_options: dict[str, Any] | None) -> Iterator[OpenAIObject]:
        """Every round's chunks under one id; a round that calls tools ends with finish_reason
        ``tool_calls`` and the next round's chunks follow once the tools ran."""
        from mistralpy.engine import openai_format as oai

        chat_id = oai.new_chat_id()
        for round_no in range(self.max_rounds + 1):
            content: list[str] = []
            calls: dict[int, dict[str, Any]] = {}
            self.round = round_no
            chunks = self.engine._chat_once(self.messages, self.params, self.chat, True, stream_options, chat_id)
            for chunk in chunks:
                for choice in chunk["choices"]:
                    _accumulate(choice["delta"], content, calls)
                yield chunk
            message = {"role": "assistant", "content": "".join(content) or None}
            if calls:
                message["tool_calls"] = [calls[i] for i in sorted(calls)]
            if round_no == self.max_rounds or not self._continue(message, message.get("tool_calls") or []):
                return

    def _continue(self, message: dict[str, Any], calls: list[dict[str, Any]]) -> bool:
        """Run this round's calls and extend the conversation; False when the loop should stop."""
        if not calls or not all(self._server_side(c["function"]["name"]) for c in calls):
            return False  # a client-side tool was called: the caller runs this round's calls
        message.pop("reasoning_content", None)  # templates re-render reasoning their own way
        self.messages.append(_plain(message))
        for call, content in zip(calls, self._run_calls(calls)):
            fn = call["function"]
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"], "content": content})
        if self.chat.get("tool_choice") not in (None, "auto", "none"):
            self.chat["tool_choice"] = "auto"  # a forced call is asked for once, not every round
        return True

    def _server_side(self, name: str) -> bool:
        return name in self.callbacks or (self.mcp is not None and self.mcp.has_tool(name))

    def _run_calls(self, calls: list[dict[str, Any]]) -> list[str | list[dict[str, Any]]]:
        """Each call's ``tool`` message content, in order (MCP calls of a round run concurrently)."""
        fns = [c["function"] for c in calls]
        out: list[Any] = [None] * len(fns)
        mcp_idx = [i for i, fn in enumerate(fns) if fn["name"] not in self.callbacks]
        if mcp_idx:
            assert self.mcp is not None
            vision = self.engine.media is not None
            results = self.mcp.call_tools_sync([(fns[i]["name"], fns[i]["arguments"]) for i in mcp_idx])
            for i, res in zip(mcp_idx, results):
                out[i] = res.message_content(vision=vision)
                self._record(fns[i], res.text(vision=False), res.to_dict())
        for i, fn in enumerate(fns):
            if out[i] is None:
                out[i] = self._call(fn["name"], fn["arguments"])
                self._record(fn, out[i])
        return out

    def _record(self, fn: dict[str, Any], text: str, mcp: dict[str, Any] | None = None) -> None:
        entry = {"round": self.round, "name": fn["name"], "arguments": fn["arguments"], "result": text}
        if mcp is not None:
            entry["mcp"] = mcp
        self.executed.append(entry)

    def _call(self, name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments) if arguments else {}
            if not isinstance(args, dict):
                raise ValueError("arguments are not a JSON object")
        except ValueError as exc:
            return f"error: invalid arguments for {name}: {exc}"
        try:
            result = self.callbacks[name](**args)
        except Exception as exc:  # noqa: BLE001 - the model is told, and may try again
            log.warning("tool %s raised %s: %s", name, type(exc).__name__, exc)
            return f"error: {type(exc).__name__}: {exc}"
        return result if isinstance(result, str) else json.dumps(result, default=str)


def _accumulate(delta: dict[str, Any], content: list[str], calls: dict[int, dict[str, Any]]) -> None:
    """Fold one streamed delta into the round's content and tool calls."""
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


def _with_mcp_tools(tools: list[dict[str, Any]] | None, mcp_tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The request's tools plus the MCP tools it does not define itself."""
    tools = list(tools or [])
    taken = {t.get("function", {}).get("name") for t in tools if isinstance(t, dict)}
    return tools + [t for t in mcp_tools if t["function"]["name"] not in taken]


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message as plain dicts (OpenAIObject unwrapped) for the template."""
    return json.loads(json.dumps(message))
