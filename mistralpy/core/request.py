"""Per-sequence state shared by the scheduler, KV manager and engine core."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from mistralpy.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, stop token or stop string
    LENGTH = "length"    # max_tokens or context end
    ABORT = "abort"      # cancelled by the client
    ERROR = "error"


@dataclass(slots=True, eq=False)
class Request:
    """One sequence. ``n > 1`` requests are fanned out into n of these by the engine."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams            # resolved
    max_total_tokens: int             # prompt + output may not exceed this (context length)
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0      # tokens whose KV is in the cache
    num_cached_tokens: int = 0        # prompt tokens served by the prefix cache at admission
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_preemptions: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of full blocks, in order
    num_committed_blocks: int = 0     # leading blocks registered in the prefix cache
    generator: torch.Generator | None = None
    dry_breaker_ids: frozenset[int] = frozenset()
    grammar: Any = None               # mistralpy.structured.GrammarMatcher for constrained requests
    logprobs: list[Any] = field(default_factory=list)
    first_token_time: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # owner's bookkeeping (detokenizer, sink)
    mm_items: list[Any] = field(default_factory=list)     # multimodal.inputs.MMItem, placeholders in the prompt
    # M-RoPE models (Qwen-VL): the prompt's (t, h, w) positions [3, P] (None: sequential, a text-only
    # prompt) and the shift of every later token: sequence index i >= P has position i + mrope_delta.
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0
    # An embedding / scoring request (mistralpy.embed.request.PoolingTask): its hidden states are
    # pooled into a vector instead of sampling a token; it finishes once its prompt is computed.
    pooling: Any = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def media_hashes_in(self, start: int, end: int) -> tuple[str, ...] | None:
        """Hashes of the media items whose placeholder runs overlap prompt positions [start, end)
        (a prefix-cache block covering them is only reused with the same media)."""
        if not self.mm_items:
            return None
        hashes = tuple(it.hash for it in self.mm_items
                       if it.placeholder.offset < end and start < it.placeholder.offset + it.placeholder.length)
        return hashes or None

    def rope_positions(self, start: int, end: int) -> torch.Tensor:
        """M-RoPE positions [3, end - start] of sequence indices [start, end): the prompt's table
        (sequential without one), then index + mrope_delta on all three axes."""
        p = len(self.prompt_token_ids)
        parts = [torch.empty(3, 0, dtype=torch.long)]
        if start < p:
            stop = min(end, p)
            parts.append(self.mrope_positions[:, start:stop] if self.mrope_positions is not None
                         else torch.arange(start, stop).expand(3, -1))
        if end > p:
            parts.append((torch.arange(max(start, p), end) + self.mrope_delta).expand(3, -1))
        return torch.cat(parts, dim=1)

    def token_at(self, i: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]
