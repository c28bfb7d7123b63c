"""SamplingParams: every sampling field of mistral.rs (and OpenAI), validated.

Fields left as ``None`` are filled from the model's generation_config.json by
:meth:`SamplingParams.resolved`, then from the neutral defaults below.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mistralpy.errors import InvalidRequestError

# mistral.rs / text-generation-webui default DRY sequence breakers.
DEFAULT_DRY_SEQUENCE_BREAKERS: tuple[str, ...] = ("\n", ":", '"', "*")

# Neutral values used when neither the request nor generation_config sets a field.
_NEUTRAL: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}

MAX_TOP_LOGPROBS = 20


@dataclass(slots=True)
class SamplingParams:
    """How to sample one request.

    temperature 0 means greedy (exact argmax). top_k 0 (or -1) disables top-k.
    ``max_tokens=None`` generates until EOS or the end of the context.
    ``logprobs=True`` returns the sampled token's logprob and ``top_logprobs`` alternatives.
    ``response_format`` / ``grammar`` constrain the output to a JSON schema, regex or grammar.
    """

    n: int = 1
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: list[str] = field(default_factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS))
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Structured output (mistralpy.structured): OpenAI response_format, or mistral.rs grammar
    # {"type": "regex" | "json_schema" | "lark" | "llguidance", "value": ...}.
    response_format: dict[str, Any] | None = None
    grammar: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.dry_sequence_breakers, str):
            self.dry_sequence_breakers = [self.dry_sequence_breakers]
        try:
            self.stop = list(self.stop or [])
        except TypeError as exc:
            raise InvalidRequestError(f"stop must be a string or a list of strings: {exc}", "stop") from exc
        try:
            self.stop_token_ids = list(self.stop_token_ids or [])
        except TypeError as exc:
            raise InvalidRequestError(f"stop_token_ids must be a list of token ids: {exc}", "stop_token_ids") from exc
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError) as exc:
                raise InvalidRequestError(f"logit_bias must map token ids to numbers: {exc}", "logit_bias") from exc
        if isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k < 0:
            self.top_k = 0  # -1 is the common "disabled" spelling
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""

        def bad(name: str, why: str) -> None:
            raise InvalidRequestError(f"{name} {why}, got {getattr(self, name)!r}", name)

        def finite(name: str) -> None:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                bad(name, "must be a finite number")

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "dry_multiplier", "dry_base"):
            finite(name)
        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.temperature is not None and self.temperature < 0:
            bad("temperature", "must be >= 0")
        if self.top_k is not None and not isinstance(self.top_k, int):
            bad("top_k", "must be an integer")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if self.dry_multiplier < 0:
            bad("dry_multiplier", "must be >= 0")
        if self.dry_base <= 1.0 and self.dry_multiplier > 0:
            bad("dry_base", "must be > 1")
        if not isinstance(self.dry_allowed_length, int) or self.dry_allowed_length < 1:
            bad("dry_allowed_length", "must be an integer >= 1")
        if not all(isinstance(s, str) for s in self.dry_sequence_breakers):
            bad("dry_sequence_breakers", "must be a list of strings")
        if self.logit_bias is not None:
            for tok, val in self.logit_bias.items():
                if tok < 0 or not math.isfinite(val) or not -100.0 <= val <= 100.0:
                    raise InvalidRequestError(
                        f"logit_bias entries must be token id >= 0 -> value in [-100, 100], got {tok}: {val}",
                        "logit_bias")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            bad("top_logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if self.top_logprobs > 0 and not self.logprobs:
            self.logprobs = True  # asking for alternatives implies logprobs
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be token ids >= 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", "must be <= max_tokens")
        key = self.structured
        if key is not None:
            from mistralpy.structured import compile_grammar

            compile_grammar(key, "response_format" if self.response_format is not None else "grammar")

    @property
    def structured(self) -> tuple[str, str] | None:
        """``(kind, text)`` of the output constraint (see mistralpy.structured), or None."""
        if self.response_format is None and self.grammar is None:
            return None
        from mistralpy.structured import grammar_key

        return grammar_key(self.response_format, self.grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def resolved(self, generation_defaults: dict[str, Any] | None = None) -> SamplingParams:
        """A copy with every ``None`` sampling field filled: request > generation_config > neutral."""
        gen = generation_defaults or {}
        updates: dict[str, Any] = {}
        for name, neutral in _NEUTRAL.items():
            if getattr(self, name) is None:
                value = gen.get(name)
                if name == "temperature" and gen.get("do_sample") is False:
                    value = 0.0
                updates[name] = neutral if value is None else value
        return dataclasses.replace(self, **updates) if updates else dataclasses.replace(self)

    def validate_vocab(self, vocab_size: int) -> None:
        """Check token ids in logit_bias / stop_token_ids against the model's vocabulary."""
        for tok in (self.logit_bias or {}):
            if tok >= vocab_size:
                raise InvalidRequestError(f"logit_bias token id {tok} is outside the vocabulary ({vocab_size})",
                                          "logit_bias")
        for tok in self.stop_token_ids:
            if tok >= vocab_size:
                raise InvalidRequestError(f"stop_token_ids has {tok}, outside the vocabulary ({vocab_size})",
                                          "stop_token_ids")
