"""Chat outputs with tools and reasoning: what a chat request asks for, and how its text becomes
an OpenAI message (``content``, ``reasoning_content``, ``tool_calls``) or streaming deltas.

A :class:`ChatSpec` is made once per chat request (:func:`chat_spec`): it checks ``tools`` and
``tool_choice``, picks the model's tool-call and reasoning formats (mistralpy.tools), and for
``tool_choice`` ``required`` or a named function builds a grammar so the call is always well formed.
Each choice then parses its output with :meth:`ChatSpec.message` (whole text) or a
:class:`ChoiceStream` (token deltas): reasoning is split off first, then tool calls from the rest.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mistralpy.errors import InvalidRequestError

log = logging.getLogger(__name__)

# The format used for tool_choice required / named when the model's own format is unknown:
# self-delimiting JSON inside <tool_call> tags, which any model can be constrained to write.
FALLBACK_TOOL_PARSER = "hermes"


@dataclass(slots=True)
class ChatSpec:
    """One chat request's output handling (see the module docstring)."""

    tools: list[dict[str, Any]] | None = None  # rendered into the template
    tool_parser: str | None = None  # parse tool calls out of the output with this format
    grammar: dict[str, Any] | None = None  # SamplingParams.grammar forcing a tool call (required / named)
    reasoning_parser: str | None = None
    starts_in_reasoning: bool = False  # the prompt already opened the reasoning block
    strict_forced: str | None = None  # "auto" with strict tools: the format's forcing grammar (note_prompt)
    marker_tokens: Mapping[str, int] | None = None
    images: list[Any] = field(default_factory=list)  # engine/media_input.MediaRef of the messages' media, in order

    @property
    def plain(self) -> bool:
        """Nothing to parse: the output is the message content as is."""
        return self.tool_parser is None and self.reasoning_parser is None

    def note_prompt(self, prompt_text: str) -> None:
        """Once the prompt is rendered: remember whether it already opened the reasoning block
        (DeepSeek-R1 and Qwen3 templates may end the generation prompt with ``<think>``), which the
        strict-tools grammar of ``auto`` mode depends on, and build that grammar."""
        reasoning = None
        if self.reasoning_parser is not None:
            from mistralpy.tools import get_reasoning_parser

            parser = get_reasoning_parser(self.reasoning_parser)
            self.starts_in_reasoning = parser.prompt_opens_reasoning(prompt_text)
            reasoning = (parser.start, parser.end)
        if self.strict_forced is not None:
            from mistralpy.tools.strict import strict_auto_grammar

            text = strict_auto_grammar(self.strict_forced, reasoning, self.starts_in_reasoning,
                                       self.marker_tokens or {})
            if text is None:
                log.warning("strict tools: no auto-mode grammar for the %s format; arguments are not "
                            "enforced", self.tool_parser)
            else:
                self.grammar = {"type": "lark", "value": text}

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)

    def message(self, text: str) -> tuple[dict[str, Any], bool]:
        """(assistant message fields, called a tool) for one choice's whole output."""
        if self.plain:
            return {"role": "assistant", "content": text}, False
        reasoning, content = None, text
        if self.reasoning_parser is not None:
            from mistralpy.tools import get_reasoning_parser

            reasoning, content = get_reasoning_parser(self.reasoning_parser, self.starts_in_reasoning).parse(text)
        calls = []
        if self.tool_parser is not None and content:
            from mistralpy.tools import get_tool_parser

            content, calls = get_tool_parser(self.tool_parser).parse(content)
        msg: dict[str, Any] = {"role": "assistant", "content": content}
        if reasoning is not None:
            msg["reasoning_content"] = reasoning
        if calls:
            msg["tool_calls"] = [c.to_openai() for c in calls]
        return msg, bool(calls)


class ChoiceStream:
    """Streaming parse of one choice: text deltas in, OpenAI ``delta`` dicts out."""

    def __init__(self, spec: ChatSpec) -> None:
        from mistralpy.tools import get_reasoning_parser, get_tool_parser

        self.reasoning = (get_reasoning_parser(spec.reasoning_parser, spec.starts_in_reasoning)
                          if spec.reasoning_parser else None)
        self.tools = get_tool_parser(spec.tool_parser) if spec.tool_parser else None

    @property
    def called(self) -> bool:
        return self.tools is not None and self.tools.called

    def feed(self, text: str) -> list[dict[str, Any]]:
        if not text:
            return []
        pieces = self.reasoning.feed(text) if self.reasoning is not None else [{"content": text}]
        return self._route(pieces)

    def finish(self) -> list[dict[str, Any]]:
        """Flush what was held back (a marker that never completed is content after all)."""
        out = self._route(self.reasoning.finish()) if self.reasoning is not None else []
        if self.tools is not None:
            out += self.tools.finish()
        return out

    def _route(self, pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for piece in pieces:
            if self.tools is not None and "content" in piece:
                out += self.tools.feed(piece["content"])
            else:
                out.append(piece)
        return out


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequestError("tools must be a list of {'type': 'function', 'function': {...}}", "tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"tools[{i}].function.name must be a non-empty string", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    return tools


def _named_tool(tool_choice: dict[str, Any], tools: list[dict[str, Any]]) -> str:
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    return name


def chat_spec(*, tools: Any, tool_choice: Any, tool_parser: str | None, reasoning_parser: str | None,
              constrained: bool = False, special_tokens: Mapping[str, int] | None = None,
              parallel_tool_calls: bool = True) -> ChatSpec:
    """Resolve a chat request's tool and reasoning handling.

    ``tool_parser`` / ``reasoning_parser`` are the model's formats (configured or detected; None if
    unknown). ``constrained``: the request already has a response_format or grammar, which cannot
    be combined with a forced tool call. ``special_tokens`` (text -> id) lets a forced call's
    grammar name markers that are special tokens of the tokenizer (Qwen's ``<tool_call>``). Call :meth:`ChatSpec.note_prompt` once the prompt is rendered.
    """
    spec = ChatSpec(reasoning_parser=reasoning_parser)
    if tools is not None and len(tools) == 0:
        tools = None
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return spec
    spec.tools = _check_tools(tools)
    if tool_choice in (None, "auto"):
        spec.tool_parser = tool_parser
        strict = any(t["function"].get("strict") is True for t in spec.tools)
        if strict and tool_parser is not None and not constrained:
            from mistralpy.tools import get_tool_parser

            _, spec.strict_forced = get_tool_parser(tool_parser).grammar(spec.tools, "required", special_tokens,
                                                                         parallel=parallel_tool_calls)
            spec.marker_tokens = special_tokens
    elif tool_choice == "none":
        pass  # the model sees the tools but is not asked to call one: its text stays content
    elif tool_choice == "required" or isinstance(tool_choice, dict):
        if isinstance(tool_choice, dict):
            _named_tool(tool_choice, spec.tools)
        if constrained:
            raise InvalidRequestError("tool_choice 'required' or a named tool cannot be combined with "
                                      "response_format or grammar", "tool_choice")
        from mistralpy.tools import get_tool_parser

        spec.tool_parser = tool_parser or FALLBACK_TOOL_PARSER
        kind, text = get_tool_parser(spec.tool_parser).grammar(spec.tools, tool_choice, special_tokens,
                                                                 parallel=parallel_tool_calls)
        spec.grammar = {"type": kind, "value": text}
    else:
        raise InvalidRequestError("tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
    return spec
