"""Mistral tool calls, both tokenizer generations.

- v3 (Mistral 7B v0.3, Mixtral, Nemo): ``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}, ...]``
  (the templates render history that way; "arguments" may be a JSON-encoded string there).
- v11+ (Small 3.x, Devstral, Magistral): ``[TOOL_CALLS]name[ARGS]{...}``, one ``[TOOL_CALLS]`` per
  call; some write ``name[CALL_ID]id[ARGS]{...}``.

Both are read by one parser. Mistral templates only accept 9-character alphanumeric call ids, so
ids are made that way. ``[TOOL_CALLS]`` is a control token: decode with special tokens kept.
"""
from __future__ import annotations

import re

from mistralpy.tools.base import (
    CALL,
    CONTENT,
    FAIL,
    SKIP,
    WAIT,
    Step,
    ToolParser,
    _Marks,
    content_until,
    new_mistral_call_id,
)
from mistralpy.tools.grammar import call_rules, lark_str
from mistralpy.tools.jsonscan import BAD, PARTIAL, loads_object, match_lit, skip_ws, value_end

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_ID = re.compile(r"[A-Za-z0-9]*")


class MistralToolParser(ToolParser):
    name = "mistral"
    list_form = True  # the grammar writes the v3 list; the v11 subclass writes name[ARGS]{...}

    def _new_id(self) -> str:
        return new_mistral_call_id()

    def _step(self, text: str, pos: int, final: bool) -> Step:
        n = len(text)
        if self._mode == "list":  # between the list's calls
            k = skip_ws(text, pos)
            if k >= n:
                return Step(SKIP, n, mode="content") if final else Step(WAIT)
            if text[k] == "]":
                return Step(SKIP, k + 1, mode="content")
            if text[k] == ",":
                j = skip_ws(text, k + 1)
                if j >= n:
                    return Step(SKIP, n, mode="content") if final else Step(WAIT)
                return self._list_call(text, pos, j, final, k + 1)
            return Step(CONTENT, pos, mode="content")
        st = content_until(text, pos, (TOOL_CALLS,), final)
        if st is not None:
            return st
        j = skip_ws(text, pos + len(TOOL_CALLS))
        if j >= n:
            return Step(FAIL, n) if final else Step(WAIT)
        if text[j] == "[":
            k = skip_ws(text, j + 1)
            if k >= n:
                return Step(FAIL, pos + len(TOOL_CALLS)) if final else Step(WAIT)
            if text[k] == "]":
                return Step(SKIP, k + 1)  # an empty list: no call
            return self._list_call(text, pos, k, final, pos + len(TOOL_CALLS))
        return self._named_call(text, pos, j, final)

    def _list_call(self, text: str, pos: int, j: int, final: bool, fail_end: int) -> Step:
        fail = Step(FAIL, fail_end, mode="content")
        call = self._object_call(text, j, final, fail)
        if call is not fail and call.done:
            call.mode = "list"
        return call

    def _named_call(self, text: str, pos: int, j: int, final: bool) -> Step:
        """``name[ARGS]{...}`` (or ``name[CALL_ID]id[ARGS]{...}``) at ``j``."""
        n = len(text)
        fail = Step(FAIL, pos + len(TOOL_CALLS))
        m = _NAME.match(text, j)
        if m is None:
            return fail
        name, k = m.group(), m.end()
        r = match_lit(text, k, ARGS)
        if r < 0:
            c = match_lit(text, k, CALL_ID)
            if c >= 0:
                r = match_lit(text, _ID.match(text, c).end(), ARGS)
            elif c == PARTIAL:
                r = PARTIAL
        if r == BAD or (r == PARTIAL and final):
            return fail
        if r == PARTIAL:
            return Step(WAIT)
        a = skip_ws(text, r)
        if a >= n:
            return fail if final else Step(CALL, name=name)
        if text[a] != "{":
            return fail
        e = value_end(text, a, final, self._memo)
        if e == BAD or (e == PARTIAL and final):
            return fail
        if e == PARTIAL:
            return Step(CALL, name=name, args=text[a:])
        if loads_object(text[a:e]) is None:
            return fail
        return Step(CALL, e, name=name, args=text[a:e], done=True)

    def _lark(self, calls: list[tuple[str, dict]], many: bool, marks: _Marks) -> str:
        if not self.list_form:
            def render_v11(name: str, args: str) -> str:
                return f"{marks(TOOL_CALLS)} {lark_str(name)} {marks(ARGS)} {args}"

            return "\n".join(["start: call+" if many else "start: call", *call_rules(calls, render_v11)])

        def render(name: str, args: str) -> str:
            head = '{"name": ' + lark_str(name) + ', "arguments": '
            return f"{lark_str(head)} {args} {lark_str('}')}"

        body = 'call (", " call)*' if many else "call"
        # The v3 templates write "[TOOL_CALLS] [" (a space before the list).
        return "\n".join([f"start: {marks(TOOL_CALLS)} \" [\" {body} \"]\"", *call_rules(calls, render)])


class MistralV11ToolParser(MistralToolParser):
    """Same parsing; the forcing grammar writes the v11 ``[TOOL_CALLS]name[ARGS]{...}`` form."""

    name = "mistral_v11"
    list_form = False

