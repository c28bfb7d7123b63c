"""Turns user prompts and SamplingParams into validated Requests (one per choice)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from mistralpy.core.request import Request
from mistralpy.errors import InvalidRequestError, PromptTooLongError
from mistralpy.sample.dry import dry_breaker_token_ids
from mistralpy.sampling_params import SamplingParams
from mistralpy.tokenizer.tokenizer import Tokenizer

Prompt = str | Sequence[int]

_ids = itertools.count()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_ids)}"


def is_token_ids(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, generation_defaults: dict[str, Any],
                 max_total_tokens: int, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.generation_defaults = generation_defaults
        self.max_total_tokens = max_total_tokens
        self.device = device
        self._dry_cache: dict[tuple[str, ...], frozenset[int]] = {}

    def encode(self, prompt: Prompt, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids). Token-id prompts are checked against the vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            text = prompt
        elif is_token_ids(prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt token ids out of range [0, {self.vocab_size}): {bad[:5]}", "prompt")
            text = None
        else:
            raise InvalidRequestError("a prompt is a string or a list of token ids", "prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        return text, ids

    def resolve_params(self, params: SamplingParams | None) -> SamplingParams:
        params = (params or SamplingParams()).resolved(self.generation_defaults)
        params.validate_vocab(self.vocab_size)
        return params

    def check_length(self, n_prompt: int, params: SamplingParams) -> None:
        limit = self.max_total_tokens
        if n_prompt >= limit:
            raise PromptTooLongError(
                f"the prompt has {n_prompt} tokens, but the context holds {limit} (prompt + output)", "prompt")
        if params.max_tokens is not None and n_prompt + params.max_tokens > limit:
            raise PromptTooLongError(
                f"prompt ({n_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the context length {limit}",
                "max_tokens")

    def make_requests(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> list[Request]:
        """One Request per choice; choice i of a seeded request uses seed + i."""
        self.check_length(len(prompt_ids), params)
        breakers = self._dry_breakers(params)
        reqs = []
        for i in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device)
                generator.manual_seed(params.seed + i)
            reqs.append(Request(
                request_id=f"{request_id}#{i}", prompt_token_ids=list(prompt_ids), params=params,
                max_total_tokens=self.max_total_tokens, eos_token_ids=self.tokenizer.eos_token_ids,
                generator=generator, dry_breaker_ids=breakers))
        return reqs

    def _dry_breakers(self, params: SamplingParams) -> frozenset[int]:
        if params.dry_multiplier <= 0:
            return frozenset()
        key = tuple(params.dry_sequence_breakers)
        if key not in self._dry_cache:
            self._dry_cache[key] = dry_breaker_token_ids(self.tokenizer.token_texts(), key)
        return self._dry_cache[key]


def choice_index(request_id: str) -> int:
    return int(request_id.rsplit("#", 1)[1])
