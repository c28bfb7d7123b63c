"""Grammars that force tool calls (``tool_choice`` "required" or a named function).

Each parser writes its model's native call syntax in llguidance's lark dialect, with every tool's
arguments constrained by its ``parameters`` JSON schema through ``%json {...}``. The JSON layout
matches structured output's (mistralpy.structured.JSON_DEFAULTS: ", " and ": " separators, no free
whitespace), which is also how the chat templates render calls (``tojson``).
"""
from __future__ import annotations

import json
from typing import Any

from mistralpy.errors import InvalidRequestError

_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def select_tools(tools: list[dict] | None, tool_choice: Any) -> tuple[list[tuple[str, dict]], bool]:
    """([(name, parameters schema)], several calls allowed) for a forcing ``tool_choice``.

    "required": one or more calls to any of ``tools``; {"type": "function", "function": {"name": N}}:
    exactly one call to N. Anything else, or an unknown name, is an InvalidRequestError.
    """
    table: dict[str, dict] = {}
    for t in tools or []:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError("each tool must be {'type': 'function', 'function': {'name': ...}}", "tools")
        params = fn.get("parameters")
        table[fn["name"]] = params if isinstance(params, dict) and params else {"type": "object"}
    if tool_choice == "required":
        if not table:
            raise InvalidRequestError("tool_choice 'required' needs at least one tool", "tool_choice")
        return list(table.items()), True
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str):
            raise InvalidRequestError("tool_choice must be {'type': 'function', 'function': {'name': ...}}",
                                      "tool_choice")
        if name not in table:
            raise InvalidRequestError(f"tool_choice names an unknown tool {name!r}", "tool_choice")
        return [(name, table[name])], False
    raise InvalidRequestError(f"no grammar for tool_choice {tool_choice!r} (only 'required' or a named function)",
                              "tool_choice")


def lark_str(s: str) -> str:
    """A lark string literal for ``s`` (JSON escaping is valid lark escaping)."""
    return json.dumps(s, ensure_ascii=False)


def json_rule(schema: dict) -> str:
    """``%json {...}`` for an arguments schema, with our fixed JSON layout unless it sets its own."""
    schema = dict(schema)
    schema.setdefault("x-guidance", _JSON_LAYOUT)
    return "%json " + json.dumps(schema, ensure_ascii=False)


def call_rules(calls: list[tuple[str, dict]], render) -> list[str]:
    """Rules ``call: call_0 | call_1 ...`` with ``call_i: render(i, name, args_rule_name)`` and the
    arguments rules; ``render`` returns a lark expansion."""
    lines = ["call: " + " | ".join(f"call_{i}" for i in range(len(calls)))]
    for i, (name, schema) in enumerate(calls):
        lines.append(f"call_{i}: " + render(name, f"args_{i}"))
        lines.append(f"args_{i}: " + json_rule(schema))
    return lines


def marker_token_ids(tokenizer: Any) -> dict[str, int]:
    """content -> id of a tokenizer's added tokens (our Tokenizer or a ``tokenizers.Tokenizer``).

    llguidance treats every added token as a special token that no text literal matches, so a grammar
    must name such markers (Qwen's ``<tool_call>``, Mistral's ``[TOOL_CALLS]``) as tokens: pass this
    to :meth:`ToolParser.grammar` as ``special_tokens``.
    """
    backend = getattr(tokenizer, "backend", tokenizer)
    return {t.content: int(i) for i, t in backend.get_added_tokens_decoder().items()}
