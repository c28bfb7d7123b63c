"""Hermes / Qwen 2.5 / Qwen 3 / SmolLM3 tool calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``.

Several calls follow each other (Qwen's template joins them with "\\n"); text before them is content.
Hermes 2 Pro writes "arguments" before "name": the call is announced once its name is known.
A call whose object is complete counts even if the closing tag never came (output cut at the stop).
"""
from __future__ import annotations

from mistralpy.tools.base import CALL, FAIL, WAIT, Step, ToolParser, _Marks, content_until
from mistralpy.tools.grammar import call_rules, lark_str
from mistralpy.tools.jsonscan import PARTIAL, match_lit, skip_ws

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"

    def _step(self, text: str, pos: int, final: bool) -> Step:
        st = content_until(text, pos, (OPEN,), final)
        if st is not None:
            return st
        fail = Step(FAIL, pos + len(OPEN))
        j = skip_ws(text, pos + len(OPEN))
        if j >= len(text):
            return fail if final else Step(WAIT)
        call = self._object_call(text, j, final, fail)
        if call is fail or not call.done:
            return call
        k = skip_ws(text, call.end)
        r = match_lit(text, k, CLOSE)
        if r >= 0:
            call.end = r
        elif r == PARTIAL and not final:
            return Step(CALL, name=call.name, args=call.args)  # the closing tag may still come
        return call

    def _lark(self, calls: list[tuple[str, dict]], many: bool, marks: _Marks) -> str:
        def render(name: str, args: str) -> str:
            head = lark_str('\n{"name": ' + lark_str(name) + ', "arguments": ')
            return f"{marks(OPEN)} {head} {args} {lark_str('}' + chr(10))} {marks(CLOSE)}"

        start = 'start: call ("\\n" call)*' if many else "start: call"
        return "\n".join([start, *call_rules(calls, render)])


