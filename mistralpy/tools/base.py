"""Tool calls in model output: the shared streaming machinery every format parser builds on.

A format parser only describes its syntax in :meth:`ToolParser._step`: looking at the undecided
text from ``pos`` it says "this much is content", "skip this separator", "a call is here (name and
arguments known so far, finished or not)", "this looked like a call but is not" or "wait for more
text". :class:`ToolParser` turns those steps into OpenAI chat-chunk deltas, and :meth:`parse` runs
the very same steps over a whole output, so streamed and non-streamed results agree by construction.

Whitespace: content is stripped as a whole and the whitespace next to a call is dropped, so
"Sure.\\n<tool_call>...": content "Sure.". Streaming holds trailing whitespace back until more
content follows, which makes the concatenated content deltas equal to :meth:`parse`'s content.
"""
from __future__ import annotations

import json
import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from mistralpy.tools.grammar import lark_str, select_tools
from mistralpy.tools.jsonscan import BAD, PARTIAL, ObjectScan, loads_object, partial_suffix, scan_object

CONTENT, SKIP, CALL, FAIL, WAIT = "content", "skip", "call", "fail", "wait"


def new_call_id() -> str:
    """OpenAI-style tool call id: "call_" + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


_ALNUM = string.ascii_letters + string.digits


def new_mistral_call_id() -> str:
    """Mistral's chat templates only accept 9 alphanumeric characters as a tool call id."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Step:
    """One decision of a format parser about ``text[pos:]``.

    kind: CONTENT (``text[pos:end]`` is content), SKIP (``text[pos:end]`` is syntax, dropped), CALL
    (a call starts at pos; ``name`` None until it is known, ``args`` the arguments text known so far,
    which only ever grows; ``done`` with ``end`` after the call), FAIL (what starts at pos is not a
    call: ``text[pos:end]`` is content and scanning goes on at ``end``), WAIT (undecided; need more).
    ``mode``: the format's state after the consumed text (None keeps it).
    """

    kind: str
    end: int = 0
    name: str | None = None
    args: str = ""
    done: bool = False
    mode: str | None = None


class ToolParser:
    """One instance per request choice; stateful while streaming (feed ... finish)."""

    name: ClassVar[str] = ""
    # Keys a call object may have (an object with any other key is not a call; this lets a plain JSON
    # answer go out as content without waiting for its end).
    call_keys: ClassVar[frozenset[str]] = frozenset({"name", "arguments", "parameters", "id", "type"})
    args_keys: ClassVar[tuple[str, ...]] = ("arguments", "parameters")

    def __init__(self) -> None:
        self._text = ""
        self._pos = 0
        self._mode = "start"
        self._calls: list[ToolCall] = []
        self._n_started = 0  # call indexes handed out (announced calls, finished or not)
        self._cur: dict[str, Any] | None = None  # the announced, unfinished call: index, id, sent
        self._ws = ""  # trailing content whitespace held back
        self._content_started = False
        self._called = False
        self._memo: dict = {}  # jsonscan.value_end's resume points (the text only grows)

    # ---- format hooks -------------------------------------------------------------------------
    def _step(self, text: str, pos: int, final: bool) -> Step:  # pragma: no cover - abstract
        raise NotImplementedError

    def _object_call(self, text: str, j: int, final: bool, fail: Step) -> Step:
        """The call whose JSON object starts at ``j`` (a CALL step, finished or not), or ``fail``
        when no object starts there or it cannot be a call."""
        if text[j] != "{":
            return fail
        call = call_from_object(text, scan_object(text, j, final, self._memo), final, j)
        return fail if call is None else call

    def _new_id(self) -> str:
        return new_call_id()

    # ---- public API ---------------------------------------------------------------------------
    @property
    def called(self) -> bool:
        """A tool call was emitted (the choice's finish_reason becomes "tool_calls")."""
        return self._called

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """Whole output -> (content outside the calls, stripped, None if empty; calls)."""
        p = type(self)()
        p._text = text
        deltas = p._run(final=True)
        content = "".join(d["content"] for d in deltas if "content" in d)
        return content or None, p._calls

    def feed(self, delta: str) -> list[dict]:
        """Streaming: the chat-chunk ``delta`` dicts that ``delta`` (more output text) decides."""
        self._text += delta
        return self._run(final=False)

    def finish(self) -> list[dict]:
        """End of stream: decide everything held back (an unfinished call becomes content)."""
        return self._run(final=True)

    def grammar(self, tools: list[dict], tool_choice: str | dict,
                special_tokens: Mapping[str, int] | None = None, parallel: bool = True) -> tuple[str, str]:
        """llguidance grammar key ``("lark", text)`` that forces this format's calls.

        tool_choice "required": one or more calls (one if not ``parallel``) to any of ``tools``; a named
        function: exactly one call to it. Arguments follow each tool's ``parameters`` schema.
        ``special_tokens`` maps markers that are added tokens of the model's tokenizer to their ids
        (:func:`mistralpy.tools.grammar.marker_token_ids`), which the grammar then names as tokens.
        InvalidRequestError (field "tool_choice") for an unknown tool name or a non-forcing choice.
        """
        calls, many = select_tools(tools, tool_choice)
        return "lark", self._lark(calls, many and parallel, _Marks(special_tokens))

    def _lark(self, calls: list[tuple[str, dict]], many: bool, marks: _Marks) -> str:  # pragma: no cover
        raise NotImplementedError

    # ---- driver -------------------------------------------------------------------------------
    def _run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        text = self._text
        while True:
            start = self._pos
            st = self._step(text, start, final)
            if st.kind == WAIT:
                break
            if st.kind == CALL and final and not st.done:
                st = Step(FAIL, len(text))  # nothing more will come: an unfinished call is no call
            if st.kind == CALL:
                self._on_call(st, out)
                if not st.done:
                    break
                self._pos = st.end
            elif st.kind == FAIL and self._cur is not None:
                # An announced call turned out broken: its text already went out as the call.
                self._cur = None
                self._pos = len(text) if final else st.end
            elif st.kind in (CONTENT, FAIL):
                self._content(text[self._pos:st.end], out)
                self._pos = st.end
            else:  # SKIP
                self._pos = st.end
            if st.mode is not None:
                self._mode = st.mode
            if st.kind != CALL and st.end <= start and st.mode is None:
                break  # a step that consumes nothing and changes nothing would repeat forever
        if final:
            self._ws = ""
        return _merge(out)

    def _content(self, s: str, out: list[dict]) -> None:
        s = self._ws + s
        if not self._content_started:
            s = s.lstrip()
        body = s.rstrip()
        self._ws = s[len(body):]
        if body:
            out.append({"content": body})
            self._content_started = True

    def _on_call(self, st: Step, out: list[dict]) -> None:
        cur = self._cur
        if cur is None and st.name is not None:
            self._ws = ""  # whitespace next to a call is not content
            cur = self._cur = {"index": self._n_started, "id": self._new_id(), "sent": 0}
            self._n_started += 1
            self._called = True
            out.append({"tool_calls": [{"index": cur["index"], "id": cur["id"], "type": "function",
                                        "function": {"name": st.name, "arguments": ""}}]})
        if cur is None:
            return
        if len(st.args) > cur["sent"]:
            out.append({"tool_calls": [{"index": cur["index"], "function": {"arguments": st.args[cur["sent"]:]}}]})
            cur["sent"] = len(st.args)
        if st.done:
            self._calls.append(ToolCall(st.name or "", st.args, cur["id"]))
            self._cur = None


def _merge(out: list[dict]) -> list[dict]:
    """Join neighbouring content deltas, and argument pieces of the same call."""
    merged: list[dict] = []
    for d in out:
        if merged:
            last = merged[-1]
            if "content" in d and "content" in last:
                last["content"] += d["content"]
                continue
            if "tool_calls" in d and "tool_calls" in last:
                a, b = last["tool_calls"][0], d["tool_calls"][0]
                pieces = set(a) == set(b) == {"index", "function"} and set(b["function"]) == {"arguments"}
                if pieces and a["index"] == b["index"]:
                    a["function"]["arguments"] += b["function"]["arguments"]
                    continue
        merged.append(d)
    return merged


def content_until(text: str, pos: int, markers: tuple[str, ...], final: bool) -> Step | None:
    """Content from ``pos`` up to the next marker (None if a marker starts right at ``pos``),
    holding back a tail that may be the start of a marker unless ``final``."""
    hits = [k for k in (text.find(m, pos) for m in markers) if k >= 0]
    if hits:
        k = min(hits)
        return None if k == pos else Step(CONTENT, k)
    end = len(text) if final else len(text) - partial_suffix(text, pos, markers)
    return Step(CONTENT, end) if end > pos else Step(WAIT)


def call_from_object(text: str, sc: ObjectScan, final: bool, start: int, end: int | None = None,
                     keys: frozenset[str] = ToolParser.call_keys,
                     args_keys: tuple[str, ...] = ToolParser.args_keys) -> Step | None:
    """Step for a call written as a JSON object {"name": ..., "arguments": {...}} (any key order).

    ``start``: where the object starts; ``end``: end of the call when the object is closed (default:
    the object's end). None when the object is not a call, or is unfinished at the end of the output
    (the caller returns its FAIL step).
    Arguments stream as the raw text of the arguments object; a JSON-encoded string of an object is
    decoded (then known only once complete); missing arguments are "{}".
    """
    if sc.state == BAD or any(k not in keys for k in sc.fields) or (sc.open_key is not None and sc.open_key not in keys):
        return None
    name = None
    if "name" in sc.fields:
        s, e = sc.fields["name"]
        if text[s] != '"':
            return None
        name = _loads_str(text[s:e])
        if not name:
            return None
    args = ""
    for k in args_keys:
        if k in sc.fields:
            s, e = sc.fields[k]
            raw = text[s:e]
            if raw.startswith("{"):
                args = raw
            elif raw.startswith('"'):
                decoded = _loads_str(raw)
                if decoded is None or loads_object(decoded) is None:
                    return None
                args = decoded
            elif raw == "null":
                args = "{}"
            else:
                return None
            break
        if sc.open_key == k:
            raw = text[sc.open_start:]
            if raw[:1] not in ("", "{", '"', "n"):
                return None
            args = raw if raw.startswith("{") else ""
            break
    if sc.state == PARTIAL:
        return None if final else Step(CALL, name=name, args=args)
    if name is None or loads_object(text[start:sc.state]) is None:
        return None
    if not any(k in sc.fields for k in args_keys):
        args = "{}"
    return Step(CALL, sc.state if end is None else end, name=name, args=args, done=True)


def _loads_str(raw: str) -> str | None:
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    return v if isinstance(v, str) else None


class _Marks:
    """Lark spelling of literal text, or of a special token (``<[id]>``) where the tokenizer has one."""

    def __init__(self, special_tokens: Mapping[str, int] | None) -> None:
        self.special = dict(special_tokens or {})

    def __call__(self, s: str) -> str:
        if s in self.special:
            return f"<[{int(self.special[s])}]>"
        return lark_str(s)
