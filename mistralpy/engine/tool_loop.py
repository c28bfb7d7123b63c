"""Server-side tools for the Python API (mistral.rs's ``tool_callbacks``).

``Engine.chat(..., tool_callbacks={"name": fn})``: after each round whose answer calls tools, every
call whose name has a callback runs here (``fn(**arguments)``); the assistant's calls and the
results (``tool`` messages) are appended to the conversation and the model continues, until an
answer calls no tool, calls a tool without a callback (returned to the caller as usual), or
``max_tool_rounds`` rounds ran. A tool that raises, or arguments that are not a JSON object, give
the model an ``error: ...`` result instead, so it can recover; the engine never dies of a tool.
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

log = logging.getLogger(__name__)


class ToolLoop:
    def __init__(self, engine: Engine, messages: Sequence[dict[str, Any]], params: SamplingParams,
                 chat: dict[str, Any], callbacks: dict[str, Callable[..., Any]], max_rounds: int) -> None:
        if not isinstance(callbacks, dict) or not all(callable(f) for f in callbacks.values()):
            raise InvalidRequestError("tool_callbacks must map tool names to callables", "tool_callbacks")
        if not isinstance(max_rounds, int) or max_rounds < 1:
            raise InvalidRequestError("max_tool_rounds must be an integer >= 1", "max_tool_rounds")
        if params.n != 1:
            raise InvalidRequestError("tool_callbacks need n = 1 (one conversation to continue)", "n")
        if not chat.get("tools"):
            raise InvalidRequestError("tool_callbacks need tools (their definitions for the model)", "tools")
        self.engine = engine
        self.messages = list(messages)
        self.params = params
        self.chat = dict(chat)
        self.callbacks = callbacks
        self.max_rounds = max_rounds

    def run(self) -> OpenAIObject:
        """The final chat.completion, with ``usage`` summed over every round."""
        totals = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for round_no in range(self.max_rounds + 1):
            result = self.engine._chat_once(self.messages, self.params, self.chat, False, None)
            for key in totals:
                totals[key] += result["usage"][key]
            message = dict(result["choices"][0]["message"])
            calls = message.get("tool_calls") or []
            if round_no == self.max_rounds or not self._continue(message, calls):
                break
        result["usage"] = {**result["usage"], **totals}
        result["tool_rounds"] = round_no
        return result

    def stream(self, stream_options: dict[str, Any] | None) -> Iterator[OpenAIObject]:
        """Every round's chunks under one id; a round that calls tools ends with finish_reason
        ``tool_calls`` and the next round's chunks follow once the tools ran."""
        from mistralpy.engine import openai_format as oai

        chat_id = oai.new_chat_id()
        for round_no in range(self.max_rounds + 1):
            content: list[str] = []
            calls: dict[int, dict[str, Any]] = {}
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
        if not calls or any(c["function"]["name"] not in self.callbacks for c in calls):
            return False
        message.pop("reasoning_content", None)  # templates re-render reasoning their own way
        self.messages.append(_plain(message))
        for call in calls:
            fn = call["function"]
            self.messages.append({"role": "tool", "tool_call_id": call["id"], "name": fn["name"],
                                  "content": self._call(fn["name"], fn["arguments"])})
        if self.chat.get("tool_choice") not in (None, "auto", "none"):
            self.chat["tool_choice"] = "auto"  # a forced call is asked for once, not every round
        return True

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


def _plain(message: dict[str, Any]) -> dict[str, Any]:
    """A message as plain dicts (OpenAIObject unwrapped) for the template."""
    return json.loads(json.dumps(message))
