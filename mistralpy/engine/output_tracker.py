"""Folds the per-sequence SeqUpdates of one user request (n choices) into RequestOutputs."""
from __future__ import annotations

from dataclasses import dataclass, field

from mistralpy.core.request import FinishReason
from mistralpy.engine.core import SeqUpdate
from mistralpy.engine.input_processor import choice_index
from mistralpy.engine.outputs import CompletionOutput, RequestOutput


def finish_reason_str(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


@dataclass(slots=True)
class RequestTracker:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    n: int
    want_logprobs: bool
    outputs: list[CompletionOutput] = field(init=False)
    num_finished: int = 0
    num_cached_tokens: int = 0
    error: str | None = None

    def __post_init__(self) -> None:
        self.outputs = [CompletionOutput(index=i, logprobs=[] if self.want_logprobs else None) for i in range(self.n)]

    @property
    def finished(self) -> bool:
        return self.num_finished >= self.n

    def apply(self, update: SeqUpdate) -> CompletionOutput:
        """Record an update; returns the delta for its choice."""
        idx = choice_index(update.req.request_id)
        out = self.outputs[idx]
        delta = CompletionOutput(index=idx, text=update.text_delta, token_ids=list(update.new_token_ids),
                                 logprobs=list(update.new_logprobs) if self.want_logprobs else None)
        out.text += update.text_delta
        out.token_ids.extend(update.new_token_ids)
        if self.want_logprobs:
            out.logprobs.extend(update.new_logprobs)
        self.num_cached_tokens = max(self.num_cached_tokens, update.req.num_cached_tokens)
        if update.finished and out.finish_reason is None:
            out.finish_reason = finish_reason_str(update.req.finish_reason) or "abort"
            out.stop_reason = update.req.stop_reason
            delta.finish_reason, delta.stop_reason = out.finish_reason, out.stop_reason
            self.num_finished += 1
        if update.error:
            self.error = update.error
        return delta

    def snapshot(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.outputs, self.finished,
                             self.num_cached_tokens, self.error)

    def delta_output(self, delta: CompletionOutput) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, [delta], self.finished,
                             self.num_cached_tokens, self.error)
