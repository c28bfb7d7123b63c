"""Reasoning ("thinking") text: ``<think>...</think>`` (Qwen3, DeepSeek-R1, SmolLM3) or Mistral's
``[THINK]...[/THINK]`` (Magistral), split from the answer into ``reasoning_content``.

The start marker is recognised only at the start of the output (after whitespace). With
``starts_in_reasoning`` (the generation prompt already opened the block, DeepSeek-R1 style)
everything before the end marker is reasoning, and a repeated start marker is dropped. A block that
never ends (output cut at max_tokens) stays reasoning, as it was streamed; an output without the
start marker (and not starting in reasoning) is all content. Like the tool parsers, :meth:`parse`
runs the streaming steps over the whole text, so both agree; each channel is stripped as a whole.
"""
from __future__ import annotations

from mistralpy.tools.jsonscan import PARTIAL, match_lit, partial_suffix, skip_ws


class ReasoningParser:
    def __init__(self, start: str = "<think>", end: str = "</think>", starts_in_reasoning: bool = False) -> None:
        self.start, self.end, self.starts_in_reasoning = start, end, starts_in_reasoning
        self._text = ""
        self._pos = 0
        self._mode = "start"
        self._held = {"reasoning_content": "", "content": ""}  # trailing whitespace per channel
        self._started = {"reasoning_content": False, "content": False}

    def prompt_opens_reasoning(self, prompt: str) -> bool:
        """True when a rendered prompt ends inside an open block (its generation prompt opened it)."""
        s, e = prompt.rfind(self.start), prompt.rfind(self.end)
        return s >= 0 and s > e and not prompt[s + len(self.start):].strip()

    def parse(self, text: str) -> tuple[str | None, str | None]:
        """Whole output -> (reasoning_content, content), each stripped, None if empty."""
        p = ReasoningParser(self.start, self.end, self.starts_in_reasoning)
        p._text = text
        got = {"reasoning_content": "", "content": ""}
        for d in p._run(final=True):
            for k, v in d.items():
                got[k] += v
        return got["reasoning_content"] or None, got["content"] or None

    def feed(self, delta: str) -> list[dict]:
        """Streaming: ``[{"reasoning_content": ...} | {"content": ...}]`` decided by ``delta``."""
        self._text += delta
        return self._run(final=False)

    def finish(self) -> list[dict]:
        return self._run(final=True)

    def _run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        text, n = self._text, len(self._text)
        if self._mode == "start":
            j = skip_ws(text, self._pos)
            r = match_lit(text, j, self.start)
            if r == PARTIAL and not final:
                return out
            if r >= 0:
                self._pos, self._mode = r, "reasoning"
            else:
                self._mode = "reasoning" if self.starts_in_reasoning else "content"
        if self._mode == "reasoning":
            k = text.find(self.end, self._pos)
            if k >= 0:
                self._emit("reasoning_content", text[self._pos:k], out)
                self._held["reasoning_content"] = ""
                self._pos, self._mode = k + len(self.end), "content"
            else:
                safe = n if final else n - partial_suffix(text, self._pos, (self.end,))
                self._emit("reasoning_content", text[self._pos:safe], out)
                self._pos = safe
        if self._mode == "content":
            self._emit("content", text[self._pos:], out)
            self._pos = n
        return out

    def _emit(self, key: str, s: str, out: list[dict]) -> None:
        s = self._held[key] + s
        if not self._started[key]:
            s = s.lstrip()
        body = s.rstrip()
        self._held[key] = s[len(body):]
        if body:
            self._started[key] = True
            if out and key in out[-1]:
                out[-1][key] += body
            else:
                out.append({key: body})
