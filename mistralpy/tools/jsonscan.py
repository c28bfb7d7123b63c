"""Incremental JSON scanning for tool-call text that is still being generated.

The parsers re-scan the undecided tail of the output after every delta, so these helpers answer
"is the JSON value at ``i`` complete, still open, or impossible?" without building it; a complete
value is then checked with :func:`json.loads`. Strings are skipped with one regex, so braces and
markers inside string values never confuse the scan.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

PARTIAL = -1  # the text ends before the thing is complete (it may still become valid)
BAD = -2  # the text can no longer become what was expected

_WS = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*', re.DOTALL)  # the rest of a string, up to its closing quote
_STRUCTURAL = re.compile(r'["\[\]{}]')
_SCALAR = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")


def skip_ws(text: str, i: int) -> int:
    """Index of the first non-whitespace character at or after ``i`` (len(text) if none)."""
    return _WS.match(text, i).end()


def match_lit(text: str, i: int, lit: str) -> int:
    """End index if ``text[i:]`` starts with ``lit``; PARTIAL if ``text[i:]`` is a proper prefix of it
    (the empty rest included); BAD otherwise."""
    if text.startswith(lit, i):
        return i + len(lit)
    return PARTIAL if lit.startswith(text[i:]) else BAD


def partial_suffix(text: str, start: int, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text[start:]`` that is a proper prefix of one of ``markers``
    (text that must be held back because it may be the start of a marker)."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text) - start), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


def value_end(text: str, i: int, final: bool, memo: dict | None = None) -> int:
    """End index of the JSON value starting at ``text[i]``; PARTIAL if it is not closed yet; BAD if
    it cannot be a JSON value. Nesting is only bracket-counted: check the span with json.loads.

    ``memo`` (one dict per growing text) keeps where the scan of an unfinished object or array
    stopped, so streaming a long arguments object costs linear, not quadratic, time.
    """
    n = len(text)
    if i >= n:
        return PARTIAL
    c = text[i]
    if c == '"':
        m = _STRING.match(text, i)
        return m.end() if m else PARTIAL
    if c in "{[":
        return _nested_end(text, i, memo)
    m = _SCALAR.match(text, i)
    if m and (m.end() < n or final):
        return m.end()
    rest = text[i:]
    if not final and (any(w.startswith(rest) for w in ("true", "false", "null"))
                      or re.fullmatch(r"-?[0-9.eE+-]*", rest)):
        return PARTIAL
    return BAD


def _nested_end(text: str, i: int, memo: dict | None) -> int:
    pos, depth, in_string = memo.get(i, (i, 0, False)) if memo is not None else (i, 0, False)
    n = len(text)
    while pos < n:
        if in_string:
            pos = _STRING_REST.match(text, pos).end()
            if pos >= n or text[pos] != '"':
                break  # the string (or an escape at the very end) goes on in the next delta
            pos, in_string = pos + 1, False
            continue
        m = _STRUCTURAL.search(text, pos)
        if m is None:
            pos = n
            break
        c, pos = m.group(), m.end()
        if c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos
    if memo is not None:
        memo[i] = (pos, depth, in_string)
    return PARTIAL


@dataclass
class ObjectScan:
    """What is known about a (possibly unfinished) JSON object: ``state`` is the end index when it is
    closed, PARTIAL or BAD; ``fields`` maps each complete member to its value span; ``open_key`` is
    the member whose value is still being generated (``open_start``: where that value starts)."""

    state: int
    fields: dict[str, tuple[int, int]] = field(default_factory=dict)
    open_key: str | None = None
    open_start: int = 0


def scan_object(text: str, i: int, final: bool, memo: dict | None = None) -> ObjectScan:
    """Scan the object whose ``{`` is at ``text[i]`` member by member."""
    n = len(text)
    out = ObjectScan(PARTIAL)
    j = skip_ws(text, i + 1)
    if j < n and text[j] == "}":
        out.state = j + 1
        return out
    while j < n:
        if text[j] != '"':
            out.state = BAD
            return out
        m = _STRING.match(text, j)
        if not m:
            return out
        try:
            key = json.loads(m.group())
        except ValueError:
            out.state = BAD
            return out
        j = skip_ws(text, m.end())
        if j >= n:
            return out
        if text[j] != ":":
            out.state = BAD
            return out
        j = skip_ws(text, j + 1)
        e = value_end(text, j, final, memo)
        if e == BAD:
            out.state = BAD
            return out
        if e == PARTIAL:
            out.open_key, out.open_start = key, j
            return out
        out.fields[key] = (j, e)
        j = skip_ws(text, e)
        if j >= n:
            return out
        if text[j] == "}":
            out.state = j + 1
            return out
        if text[j] != ",":
            out.state = BAD
            return out
        j = skip_ws(text, j + 1)
    return out


def loads_object(raw: str) -> dict | None:
    """The object ``raw`` encodes, or None if it is not valid JSON or not an object."""
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None
