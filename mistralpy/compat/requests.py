"""mistral.rs's Python request classes (``ChatCompletionRequest``, ``CompletionRequest``): the same
field names and defaults (``n_choices``, ``stop_seqs``, ``echo_prompt``, ...), turned into our
SamplingParams. OpenAI spellings (``n``, ``stop``, ``seed``) are accepted as well."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mistralpy.compat.which import UnsupportedModelKindError
from mistralpy.errors import InvalidRequestError
from mistralpy.sampling_params import SamplingParams


@dataclass
class _Sampling:
    """Fields both request kinds share (keyword-only in practice: every script passes them by name)."""

    model: str = "default"
    logit_bias: dict[int, float] | None = None
    max_tokens: int | None = None
    n_choices: int = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop_seqs: list[str] | str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    grammar: str | None = None
    grammar_type: str | None = None
    adapters: list[str] | None = None
    truncate_sequence: bool = False
    stream: bool = False
    # OpenAI spellings and our extensions.
    n: int | None = None
    stop: list[str] | str | None = None
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    def _grammar(self) -> dict[str, Any] | None:
        """mistral.rs's grammar + grammar_type pair as our {"type", "value"} grammar."""
        if self.grammar is None:
            if self.grammar_type is not None:
                raise InvalidRequestError("grammar_type given without grammar", "grammar")
            return None
        kind = {"json": "json_schema", "json_schema": "json_schema", "regex": "regex", "lark": "lark",
                "llguidance": "llguidance"}.get((self.grammar_type or "regex").lower())
        if kind is None:
            raise InvalidRequestError(f"unknown grammar_type {self.grammar_type!r}; use regex, json_schema, lark "
                                      "or llguidance", "grammar_type")
        return {"type": kind, "value": self.grammar}

    def _check_unsupported(self) -> None:
        if self.adapters:
            raise UnsupportedModelKindError("adapters (LoRA) are not supported yet")

    def _response_format(self) -> Any:
        return None

    def sampling_params(self, *, logprobs: bool = False, top_logprobs: int = 0, n: int | None = None) -> SamplingParams:
        self._check_unsupported()
        stop = self.stop if self.stop is not None else self.stop_seqs
        values: dict[str, Any] = {
            "n": n or self.n or self.n_choices, "max_tokens": self.max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "dry_multiplier": self.dry_multiplier,
            "dry_base": self.dry_base, "dry_allowed_length": self.dry_allowed_length,
            "dry_sequence_breakers": self.dry_sequence_breakers, "seed": self.seed, "logprobs": logprobs,
            "top_logprobs": top_logprobs, "ignore_eos": self.ignore_eos, "min_tokens": self.min_tokens,
            "stop": [stop] if isinstance(stop, str) else stop,
            "logit_bias": {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None,
            "grammar": self._grammar(), "response_format": self._response_format()}
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except TypeError as exc:
            raise InvalidRequestError(str(exc)) from exc


@dataclass(kw_only=True)
class ChatCompletionRequest(_Sampling):
    """A chat request. ``messages`` is a list of {"role", "content"} dicts (content: text or a list of
    text parts), or a string: an already templated prompt, sent as is."""

    messages: list[dict[str, Any]] | str
    logprobs: bool = False
    top_logprobs: int | None = None
    tool_schemas: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: Any = None
    web_search_options: Any = None
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def _response_format(self) -> Any:
        return self.response_format

    def sampling(self) -> SamplingParams:
        if self.web_search_options is not None:
            raise UnsupportedModelKindError("web_search_options is not supported")
        return self.sampling_params(logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0)


@dataclass(kw_only=True)
class CompletionRequest(_Sampling):
    """A raw text completion request (no chat template)."""

    prompt: str | list[int]
    echo_prompt: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: bool = False
