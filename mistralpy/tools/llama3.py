"""Llama 3.1 / 3.2 / 3.3 JSON tool calls: ``{"name": ..., "parameters": {...}}`` (also "arguments").

The calls are the whole answer: optionally after ``<|python_tag|>``, several separated by ";".
A ``{`` only opens a call at the start of the output (after ``<|python_tag|>`` anywhere); an object
with keys a call cannot have (a plain JSON answer) is content as soon as such a key shows up.
"""
from __future__ import annotations

from mistralpy.tools.base import CONTENT, FAIL, SKIP, WAIT, Step, ToolParser, _Marks, content_until
from mistralpy.tools.grammar import call_rules, lark_str
from mistralpy.tools.jsonscan import PARTIAL, match_lit, skip_ws

TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def _step(self, text: str, pos: int, final: bool) -> Step:
        n = len(text)
        if self._mode == "start":
            j = skip_ws(text, pos)
            if j >= n:
                return Step(SKIP, n) if final else Step(WAIT)
            r = match_lit(text, j, TAG)
            if r >= 0:
                return self._call(text, pos, skip_ws(text, r), final, r)
            if r == PARTIAL and not final:
                return Step(WAIT)
            if text[j] == "{":
                return self._call(text, pos, j, final, j + 1)
            return Step(CONTENT, pos, mode="content")
        if self._mode == "after":  # after a call: ";" and the next call, or the end of the calls
            k = skip_ws(text, pos)
            if k >= n:
                return Step(SKIP, n) if final else Step(WAIT)
            if text[k] == ";":
                j = skip_ws(text, k + 1)
                if j >= n:
                    return Step(SKIP, n) if final else Step(WAIT)
                if text[j] == "{":
                    return self._call(text, pos, j, final, k + 1)
                return Step(FAIL, k + 1, mode="content")
            r = match_lit(text, k, TAG)
            if r == PARTIAL and not final:
                return Step(WAIT)
            return Step(SKIP, pos, mode="start" if r >= 0 else "content")
        st = content_until(text, pos, (TAG,), final)
        return st if st is not None else Step(SKIP, pos, mode="start")

    def _call(self, text: str, pos: int, j: int, final: bool, fail_end: int) -> Step:
        """The call object at ``j`` (the step covers the opener from ``pos``); FAIL leaves the
        opener up to ``fail_end`` as content and the rest is read as content."""
        fail = Step(FAIL, fail_end, mode="content")
        if j >= len(text):
            return fail if final else Step(WAIT)
        call = self._object_call(text, j, final, fail)
        if call is not fail and call.done:
            call.mode = "after"
        return call

    def _lark(self, calls: list[tuple[str, dict]], many: bool, marks: _Marks) -> str:
        def render(name: str, args: str) -> str:
            head = '{"name": ' + lark_str(name) + ', "parameters": '
            return f"{lark_str(head)} {args} {lark_str('}')}"

        start = 'start: call ("; " call)*' if many else "start: call"
        return "\n".join([start, *call_rules(calls, render)])
