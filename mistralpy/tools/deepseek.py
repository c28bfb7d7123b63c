"""DeepSeek V3 / R1 tool calls, and the V3.1 variant.

V3 / R1 (what their chat templates render, one call per line inside the block)::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {...}
    ```<｜tool▁call▁end｜>
    <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

V3.1: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``. One parser reads both: what
follows the separator tells them apart (``{``: V3.1). Text before the block is content.
"""
from __future__ import annotations

import re

from mistralpy.tools.base import CALL, CONTENT, FAIL, SKIP, WAIT, Step, ToolParser, _Marks, content_until
from mistralpy.tools.grammar import call_rules, lark_str
from mistralpy.tools.jsonscan import BAD, PARTIAL, loads_object, match_lit, skip_ws, value_end

CALLS_BEGIN = "<\uff5ctool\u2581calls\u2581begin\uff5c>"
CALLS_END = "<\uff5ctool\u2581calls\u2581end\uff5c>"
CALL_BEGIN = "<\uff5ctool\u2581call\u2581begin\uff5c>"
CALL_END = "<\uff5ctool\u2581call\u2581end\uff5c>"
SEP = "<\uff5ctool\u2581sep\uff5c>"
FENCE_OPEN, FENCE_CLOSE = "```json", "```"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_MAX_HEAD = 128  # a call head (type or name) longer than this without its separator is not a call


class DeepSeekV3ToolParser(ToolParser):
    name = "deepseek_v3"
    v31 = False  # grammar form

    def _step(self, text: str, pos: int, final: bool) -> Step:
        n = len(text)
        if self._mode == "block":  # inside <｜tool▁calls▁begin｜>: another call, or the block's end
            k = skip_ws(text, pos)
            if k >= n:
                return Step(SKIP, n, mode="content") if final else Step(WAIT)
            r = match_lit(text, k, CALLS_END)
            if r >= 0:
                return Step(SKIP, r, mode="content")
            c = match_lit(text, k, CALL_BEGIN)
            if c >= 0:
                return self._call(text, pos, c, final, c)
            if PARTIAL in (r, c) and not final:
                return Step(WAIT)
            return Step(CONTENT, pos, mode="content")
        st = content_until(text, pos, (CALLS_BEGIN, CALL_BEGIN), final)
        if st is not None:
            return st
        if text.startswith(CALL_BEGIN, pos):
            return self._call(text, pos, pos + len(CALL_BEGIN), final, pos + len(CALL_BEGIN))
        k = skip_ws(text, pos + len(CALLS_BEGIN))
        c = match_lit(text, k, CALL_BEGIN)
        if c >= 0:
            return self._call(text, pos, c, final, pos + len(CALLS_BEGIN))
        if c == PARTIAL and not final:
            return Step(WAIT)
        return Step(FAIL, pos + len(CALLS_BEGIN))

    def _call(self, text: str, pos: int, t: int, final: bool, fail_end: int) -> Step:
        """The call whose head starts at ``t`` (right after <｜tool▁call▁begin｜>)."""
        n = len(text)
        fail = Step(FAIL, fail_end, mode="content")
        s = text.find(SEP, t)
        if s < 0:
            if final or n - t > _MAX_HEAD or "\n" in text[t:]:
                return fail
            return Step(WAIT)
        head = text[t:s].strip()
        a = s + len(SEP)
        if a >= n:
            return fail if final else Step(WAIT)
        if text[a] == "{":  # V3.1: the head is the name
            name, j = head, a
        else:  # V3: the head is the type ("function"), the name runs to the end of the line
            nl = text.find("\n", a)
            if nl < 0:
                return fail if final or n - a > _MAX_HEAD else Step(WAIT)
            name = text[a:nl].strip()
            k = skip_ws(text, nl)
            f = match_lit(text, k, FENCE_OPEN)
            if f == BAD or (f == PARTIAL and final):
                return fail
            if f == PARTIAL:
                return Step(CALL, name=name) if _NAME.fullmatch(name) else Step(WAIT)
            j = skip_ws(text, f)
        if not _NAME.fullmatch(name):
            return fail
        if j >= n:
            return fail if final else Step(CALL, name=name)
        if text[j] != "{":
            return fail
        e = value_end(text, j, final, self._memo)
        if e == BAD or (e == PARTIAL and final):
            return fail
        if e == PARTIAL:
            return Step(CALL, name=name, args=text[j:])
        args = text[j:e]
        if loads_object(args) is None:
            return fail
        # The closing: V3 "\n```" then <｜tool▁call▁end｜>; a call whose arguments are complete counts
        # even if the closing is missing (output cut at the stop).
        k = skip_ws(text, e)
        end = e
        for lit in ((FENCE_CLOSE, CALL_END) if j != a else (CALL_END,)):
            r = match_lit(text, k, lit)
            if r == PARTIAL and not final:
                return Step(CALL, name=name, args=args)
            if r < 0:
                break
            end = r
            k = skip_ws(text, r)
        return Step(CALL, end, name=name, args=args, done=True, mode="block")

    def _lark(self, calls: list[tuple[str, dict]], many: bool, marks: _Marks) -> str:
        if self.v31:
            def render(name: str, args: str) -> str:
                return f"{marks(CALL_BEGIN)} {lark_str(name)} {marks(SEP)} {args} {marks(CALL_END)}"
            sep = "call*" if many else ""
        else:
            def render(name: str, args: str) -> str:
                return (f"{marks(CALL_BEGIN)} \"function\" {marks(SEP)} {lark_str(name + chr(10) + FENCE_OPEN + chr(10))} "
                        f"{args} {lark_str(chr(10) + FENCE_CLOSE)} {marks(CALL_END)}")
            sep = '("\\n" call)*' if many else ""
        return "\n".join([f"start: {marks(CALLS_BEGIN)} call {sep} {marks(CALLS_END)}", *call_rules(calls, render)])


class DeepSeekV31ToolParser(DeepSeekV3ToolParser):
    """Same parsing; the forcing grammar writes the V3.1 form."""

    name = "deepseek_v31"
    v31 = True
