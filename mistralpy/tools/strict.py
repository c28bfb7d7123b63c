"""``strict: true`` tools under ``tool_choice: "auto"``: the model may answer in text or call tools,
and any call it makes has arguments that validate against the tool's schema.

The grammar is ``start: reasoning? TEXT? calls?`` where ``calls`` is the format's forcing grammar
(:meth:`ToolParser.grammar` for "required"). This only works when that grammar opens with a
marker that is a token (Qwen's ``<tool_call>``, ``[TOOL_CALLS]``, DeepSeek's
``<｜tool▁calls▁begin｜>``): free text can never spell a token, so the text ends exactly where the
model emits the marker. Llama 3's calls are bare JSON objects, which its parser recognises only at
the start of the output: there the grammar is "calls, or text that does not open with ``{``".
Reasoning blocks whose markers are tokens are allowed before the answer (a token-only grammar
would otherwise forbid ``<think>``).
"""
from __future__ import annotations

from collections.abc import Mapping


def _rules(lark: str) -> dict[str, str]:
    rules = {}
    for line in lark.splitlines():
        name, sep, expansion = line.partition(": ")
        if sep and name.replace("_", "").isalnum():
            rules[name] = expansion.strip()
    return rules


def opens_with_token(forced: str) -> bool:
    """Every derivation of the forcing grammar starts with a token reference ``<[id]>``."""
    rules = _rules(forced)
    start = rules.get("start", "")
    if start.startswith("<["):
        return True
    calls = [v for k, v in rules.items() if k.startswith("call_")]
    return start.startswith("call") and bool(calls) and all(v.startswith("<[") for v in calls)


def opens_with_brace(forced: str) -> bool:
    """Every call is a bare JSON object (Llama 3): ``call_i`` expansions start with the text ``{``."""
    rules = _rules(forced)
    calls = [v for k, v in rules.items() if k.startswith("call_")]
    return rules.get("start", "").startswith("call") and bool(calls) and all(v.startswith('"{') for v in calls)


def strict_auto_grammar(forced: str, reasoning: tuple[str, str] | None, starts_in_reasoning: bool,
                        tokens: Mapping[str, int]) -> str | None:
    """The lark grammar for text-or-strict-calls, or None when the format cannot be constrained so.

    ``forced``: the format's lark grammar for tool_choice "required"; ``reasoning``: the (start, end)
    markers of the model's reasoning block, if any; ``tokens``: added-token text -> id."""
    if not forced.startswith("start: "):
        return None
    if not opens_with_token(forced):
        if not opens_with_brace(forced):
            return None
        # Bare JSON calls (Llama 3): the parser takes an output that opens with "{" as calls, so
        # either the output is calls, or it is text that does not open with "{".
        return "start: TEXT | calls\nTEXT: /[^{\\s](?s:.*)/\n" + forced.replace("start: ", "calls: ", 1)
    lines = ["start: reasoning? TEXT? calls?"]
    if reasoning is not None and reasoning[1] in tokens and (starts_in_reasoning or reasoning[0] in tokens):
        opener = "" if starts_in_reasoning else f"<[{tokens[reasoning[0]]}]> "
        lines += [f"reasoning: {opener}THINK? <[{tokens[reasoning[1]]}]>", "THINK: /(?s:.+)/"]
    else:
        lines[0] = "start: TEXT? calls?"
    lines.append("TEXT: /(?s:.+)/")
    return "\n".join(lines) + "\n" + forced.replace("start: ", "calls: ", 1)
