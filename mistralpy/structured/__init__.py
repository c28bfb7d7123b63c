"""Grammar-constrained decoding (structured output) through llguidance.

A request asks for it with ``SamplingParams.response_format`` (OpenAI: ``{"type": "json_object"}`` or
``{"type": "json_schema", "json_schema": {"schema": ...}}``) or ``SamplingParams.grammar``
(mistral.rs: ``{"type": "regex" | "json_schema" | "lark" | "llguidance", "value": ...}``).

- :func:`grammar_key` turns those fields into a hashable ``(kind, text)``; :func:`compile_grammar`
  compiles it to an llguidance grammar, validated and cached per key (an invalid grammar is an
  :class:`InvalidRequestError` naming the field, with the compiler's message).
- :class:`StructuredBackend` (one per engine) wraps our tokenizer as an ``LLTokenizer`` and makes one
  :class:`GrammarMatcher` per request; the sampler masks the logits of constrained rows with
  :meth:`GrammarMatcher.allowed_mask` and the engine feeds every sampled token to
  :meth:`GrammarMatcher.accept`; the request finishes (``stop``) when the matcher is stopped.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

import torch

from mistralpy.errors import InvalidRequestError

GRAMMAR_KINDS = ("regex", "json_schema", "lark", "llguidance")
# JSON layout: '{"a": 1, "b": [2, 3]}', no free whitespace (a weak model would otherwise pad forever);
# a schema's "x-guidance" object overrides these.
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BITS = None  # lazily: torch.arange(32) as int32


def _llg():
    try:
        import llguidance
    except ImportError as exc:  # pragma: no cover - a runtime dependency
        raise InvalidRequestError(f"structured output needs the llguidance package: {exc}") from exc
    return llguidance


def grammar_key(response_format: Any, grammar: Any) -> tuple[str, str] | None:
    """``(kind, text)`` for the request's constraint, or None; kind is one of GRAMMAR_KINDS.

    A JSON schema is kept in its key order (properties are generated in that order).
    """
    if response_format is not None and grammar is not None:
        raise InvalidRequestError("give either response_format or grammar, not both", "grammar")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise InvalidRequestError("response_format must be an object with a 'type'", "response_format")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return "json_schema", json.dumps({"type": "object"})
        if kind == "json_schema":
            js = response_format.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if schema is None and isinstance(js, dict) and "schema" not in js:
                schema = {}  # OpenAI allows a json_schema without a schema: any JSON
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError("response_format.json_schema.schema must be a JSON schema object",
                                          "response_format")
            return "json_schema", json.dumps(schema)
        raise InvalidRequestError(
            f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", "response_format")
    if grammar is not None:
        if not isinstance(grammar, dict):
            raise InvalidRequestError("grammar must be an object with 'type' and 'value'", "grammar")
        kind, value = grammar.get("type"), grammar.get("value")
        if kind not in GRAMMAR_KINDS:
            raise InvalidRequestError(f"grammar.type must be one of {', '.join(GRAMMAR_KINDS)}, got {kind!r}",
                                      "grammar")
        if kind in ("json_schema", "llguidance") and isinstance(value, (dict, bool)):
            return kind, json.dumps(value)
        if not isinstance(value, str):
            raise InvalidRequestError(f"grammar.value must be a string for type {kind!r}", "grammar")
        return kind, value
    return None


@functools.lru_cache(maxsize=256)
def _compile(kind: str, text: str) -> tuple[str | None, str]:
    """(llguidance grammar, "") or (None, error message). Cached per (kind, text)."""
    llg = _llg()
    M = llg.LLMatcher
    try:
        if kind == "regex":
            g = M.grammar_from_regex(text)
        elif kind == "lark":
            g = M.grammar_from_lark(text)
        elif kind == "json_schema":
            g = M.grammar_from_json_schema(text, defaults=JSON_DEFAULTS)
        else:  # llguidance: the grammar JSON itself
            json.loads(text)
            g = text
    except (ValueError, TypeError) as exc:
        return None, str(exc)
    err = M.validate_grammar(g)
    return (None, err) if err else (g, "")


def compile_grammar(key: tuple[str, str], field: str = "grammar") -> str:
    """The validated llguidance grammar for ``key``; InvalidRequestError naming ``field`` if it does not compile."""
    grammar, err = _compile(*key)
    if grammar is None:
        raise InvalidRequestError(f"invalid {key[0]} {field}: {err.strip()}", field)
    return grammar


class GrammarMatcher:
    """One request's grammar state: the allowed-token mask for the next step, and the tokens taken."""

    __slots__ = ("matcher", "vocab_size")

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def allowed_mask(self, V: int) -> torch.Tensor | None:
        """Bool [V] of tokens the grammar allows next (CPU), or None when it constrains nothing (error)."""
        global _BITS
        if self.matcher.is_error():
            return None
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)
        if _BITS is None:
            _BITS = torch.arange(32, dtype=torch.int32)
        bits = ((words.unsqueeze(1) >> _BITS) & 1).view(-1).bool()
        if bits.numel() >= V:
            return bits[:V]
        out = torch.zeros(V, dtype=torch.bool)
        out[: bits.numel()] = bits
        return out

    def accept(self, token: int) -> bool:
        """Feed the sampled token; False if the grammar rejected it (the matcher is then in error)."""
        return self.matcher.consume_token(token)

    def is_stopped(self) -> bool:
        """The grammar admits no more tokens (complete, or EOS taken)."""
        return self.matcher.is_stopped()

    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class StructuredBackend:
    """Per engine: our tokenizer as an llguidance tokenizer (built once) and per-request matchers."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._llt = None

    @property
    def ll_tokenizer(self):
        if self._llt is None:
            llg = _llg()
            backend = self._tokenizer.backend
            n_vocab = max(self.vocab_size, backend.get_vocab_size(with_added_tokens=True))
            self._llt = llg.LLTokenizer(backend.to_str(), n_vocab=n_vocab, eos_token=self._eos or None)
        return self._llt

    def matcher(self, key: tuple[str, str]) -> GrammarMatcher:
        grammar = compile_grammar(key)
        m = _llg().LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if m.is_error():
            raise InvalidRequestError(f"invalid {key[0]} grammar: {m.get_error()}", "grammar")
        return GrammarMatcher(m, self.vocab_size)
