"""Server-side tools for the Python API (mistral.rs's ``tool_callbacks``).

``Engine.chat(..., tool_callbacks={"name": fn})``: after each round whose answer calls tools, every
call whose name has a callback runs here (``fn(**arguments)``); the assistant's calls and the
results (``tool`` messages) are appended to the conversation and the model continues, until an
answer calls no tool, calls a tool without a callback (returned to the caller as usual), or
``max_tool_rounds`` rounds ran. A tool that raises, or arguments that are not a JSON object, give
the model an ``error: ...`` result instead, so it can recover; the engine never dies of a tool.

The engine's own server-side tools run the same way (``Engine.server_tools``): MCP tools
(``Engine(mcp_config=...)``; with ``auto_register_tools`` their definitions join the request's
``tools``, a tool the caller defined under the same name keeping the caller's definition), a
``tool_dispatch_url`` and the search tools (``enable_search``). One round's calls run concurrently.
A vision model gets an MCP image result as image parts of the ``tool`` message. The final
response lists every executed call in ``agentic_tool_calls`` ([{round, name, arguments, result}]).
The round logic is engine/tool_rounds.py, shared with the server's loop (server/tool_loop.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mistralpy.engine.outputs import OpenAIObject
from mistralpy.engine.tool_rounds import Rounds, ServerTools, ToolContext, accumulate, run_sync, sum_usage
from mistralpy.errors import InvalidRequestError
from mistralpy.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mistralpy.engine.llm_engine import Engine


class ToolLoop:
    def __init__(self, engine: Engine, messages: Sequence[dict[str, Any]], params: SamplingParams,
                 chat: dict[str, Any], callbacks: dict[str, Callable[..., Any]], max_rounds: int,
                 tools: ServerTools | None = None) -> None:
        if not isinstance(callbacks, dict) or not all(callable(f) for f in callbacks.values()):
            raise InvalidRequestError("tool_callbacks must map tool names to callables", "tool_callbacks")
        if not isinstance(max_rounds, int) or max_rounds < 1:
            raise InvalidRequestError("max_tool_rounds must be an integer >= 1", "max_tool_rounds")
        if params.n != 1:
            raise InvalidRequestError("tool_callbacks need n = 1 (one conversation to continue)", "n")
        self.engine = engine
        self.params = params
        self.server_tools = tools if tools is not None else ServerTools()
        self.rounds = Rounds(messages, chat, self.server_tools.with_callbacks(callbacks), max_rounds)
        if callbacks and not self.rounds.chat.get("tools"):
            raise InvalidRequestError("tool_callbacks need tools (their definitions for the model)", "tools")
        self.ctx = ToolContext(vision=engine.media is not None,
                               count_tokens=lambda text: len(engine.tokenize(text, add_special_tokens=False)))

    @property
    def executed(self) -> list[dict[str, Any]]:
        return self.rounds.executed

    def run(self) -> OpenAIObject:
        """The final chat.completion, with ``usage`` summed over every round."""
        usages = []
        while True:
            result = self.engine._chat_once(self.rounds.messages, self.params, self.rounds.chat, False, None)
            usages.append(dict(result["usage"]))
            message = dict.__getitem__(result, "choices")[0]["message"]  # the plain dict, not a wrapped copy
            client = self._after_round(message, message.get("tool_calls") or [])
            if client is not None:
                if client != (message.get("tool_calls") or []):
                    message["tool_calls"] = client  # the server-side calls of a mixed round ran here
                break
        result["usage"] = {**result["usage"], **sum_usage(usages)}
        result["tool_rounds"] = self.rounds.round
        if self.server_tools or self.executed:
            result["agentic_tool_calls"] = self.executed
        return result

    def stream(self, stream_options: dict[str, Any] | None) -> Iterator[OpenAIObject]:
        """Every round's chunks under one id; a round that calls tools ends with finish_reason
        ``tool_calls`` and the next round's chunks follow once the tools ran."""
        from mistralpy.engine import openai_format as oai

        chat_id = oai.new_chat_id()
        while True:
            content: list[str] = []
            calls: dict[int, dict[str, Any]] = {}
            chunks = self.engine._chat_once(self.rounds.messages, self.params, self.rounds.chat, True,
                                            stream_options, chat_id)
            for chunk in chunks:
                for choice in chunk["choices"]:
                    accumulate(choice["delta"], content, calls)
                yield chunk
            message = {"role": "assistant", "content": "".join(content) or None}
            if self._after_round(message, [calls[i] for i in sorted(calls)]) is not None:
                return

    def _after_round(self, message: dict[str, Any], calls: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """Run this round's server-side calls. None: the conversation goes on; else the loop ends
        and these calls are the caller's (the client-side ones)."""
        here, client = self.rounds.split(calls)
        if not here:
            return client
        outcomes = run_sync(self.rounds.execute(here, self.ctx))
        if client:
            return client
        self.rounds.extend(message, here, outcomes)
        return None
