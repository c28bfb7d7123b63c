"""Incremental detokenization with stop strings, UTF-8 safe.

Each step decodes only a small window of ids: the "prefix" window (ids already turned into text,
kept as context so SentencePiece spaces and byte-level merges decode as they do in the full text)
plus the ids not yet read. The new text is the window's text minus the prefix window's text. While
the window's text ends in U+FFFD (an incomplete UTF-8 sequence, e.g. half of an emoji or byte-fallback
tokens like <0xE6>), the ids stay unread until the character completes.

With `skip_special_tokens`, special added tokens are dropped on arrival: `tokenizers` drops them
before running its decoders, so the text of the kept ids equals `decode(output_ids)`.
The concatenation of all deltas equals `tokenizer.decode(output_ids)` (cut at a matched stop string).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mistralpy.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"
# A UTF-8 character spans at most 4 bytes, so at most 4 tokens. After this many unread tokens whose
# text still ends in U+FFFD, the bytes are invalid for good: stop waiting for them.
_MAX_PENDING = 8
# Prompt ids kept as decoding context for the first output tokens.
_PROMPT_CONTEXT = 4


class IncrementalDetokenizer:
    """Turns generated ids into text deltas for one request.

    `push(ids)` feeds new ids and returns the stop string it matched (the output is then cut there),
    `take_delta()` returns the text not yet handed out, withholding any tail that may still turn into
    a stop string and any incomplete character. `output_text` is everything decoded so far.
    `prompt_token_ids` is accepted for API symmetry; the text depends on the output ids alone.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], *,
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skip_ids: frozenset[int] = tokenizer.special_added_ids if skip_special_tokens else frozenset()
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(s for s in stop if s))
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.num_prompt_tokens = len(prompt_token_ids)

        self.output_ids: list[int] = []   # every id pushed (specials included)
        # The ids that make text, led by a few prompt ids as context: tokenizers whose decoder strips
        # a leading space (Llama 2 / Mistral SentencePiece) then keep the space of the first output
        # token (" Paris"), as the text would read after the prompt.
        self._ids: list[int] = self._prompt_context(prompt_token_ids)
        self._prefix_offset = 0           # self._ids[prefix:read] is the context window, already read
        self._read_offset = len(self._ids)
        self.output_text = ""
        self._sent = 0                    # chars of output_text handed out by take_delta
        self.stop_reason: str | None = None   # the stop string matched, if any
        self._flushed = False

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        tail = [int(t) for t in list(prompt_token_ids)[-_PROMPT_CONTEXT:] if int(t) not in self._skip_ids]
        # A tail that decodes to an incomplete character would shift the first delta: use none.
        if tail and self.tokenizer.decode(tail, skip_special_tokens=False).endswith(_REPLACEMENT):
            return []
        return tail

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def push(self, token_ids: Sequence[int]) -> str | None:
        """Feed newly generated ids. Returns the stop string matched (output truncated at it), else None.

        Once a stop string matched, further ids are recorded in `output_ids` but make no text.
        """
        token_ids = [int(t) for t in token_ids]
        self.output_ids.extend(token_ids)
        if self.stop_reason is not None or self._flushed:
            return None
        kept = [t for t in token_ids if t not in self._skip_ids] if self._skip_ids else token_ids
        if not kept:
            return None
        self._ids.extend(kept)
        return self._append(self._read_new(final=False))

    def take_delta(self, final: bool = False) -> str:
        """Text not handed out yet. Not final: withholds a possible stop-string start and partial
        characters. final=True flushes everything that belongs to the output."""
        if final and self.stop_reason is None and not self._flushed:
            self._append(self._read_new(final=True))
            self._flushed = True
        end = len(self.output_text)
        if not final and self.stop_reason is None:
            end -= self._held_back()
        start = min(self._sent, end)
        delta = self.output_text[start:end]
        self._sent = max(self._sent, end)
        return delta

    # ------------------------------------------------------------------------------- internals
    def _read_new(self, final: bool) -> str:
        """Decode the unread ids in context; advance the offsets when the text is complete."""
        ids = self._ids
        if self._read_offset >= len(ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=False)
        new_text = decode(ids[self._prefix_offset:], skip_special_tokens=False)
        end = len(ids)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            if len(ids) - self._read_offset < _MAX_PENDING:
                return ""  # wait for the rest of the character
            # Invalid bytes never complete: emit up to the last id boundary with complete text.
            for k in range(len(ids) - 1, self._read_offset, -1):
                text = decode(ids[self._prefix_offset:k], skip_special_tokens=False)
                if len(text) > len(prefix_text) and not text.endswith(_REPLACEMENT):
                    new_text, end = text, k
                    break
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, end
        return delta

    def _append(self, delta: str) -> str | None:
        if not delta:
            return None
        old_len = len(self.output_text)
        self.output_text += delta
        if not self.stop:
            return None
        # A new match must end inside the new text; it can start up to (longest stop - 1) chars earlier.
        search_from = max(0, old_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.output_text.find(s, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.output_text = self.output_text[:i + len(s) if self.include_stop_str_in_output else i]
        self.stop_reason = s
        return s

    def _held_back(self) -> int:
        """Length of the longest tail of output_text that is a proper prefix of a stop string."""
        text = self.output_text
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), held, -1):
                if text.endswith(s[:k]):
                    held = k
                    break
        return held
