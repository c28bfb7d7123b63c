"""EngineCore: one step = schedule -> run the model -> append tokens, detokenize, check stops.

Not thread-safe; the EngineLoop thread is its only caller.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from mistralpy.config import EngineConfig
from mistralpy.core.kv_manager import KVCacheManager
from mistralpy.core.request import FinishReason, Request, RequestStatus
from mistralpy.core.scheduler import Scheduler
from mistralpy.engine.detokenizer import IncrementalDetokenizer
from mistralpy.engine.outputs import LogprobEntry, TopLogprob
from mistralpy.structured import StructuredBackend
from mistralpy.tokenizer.tokenizer import Tokenizer
from mistralpy.worker.model_runner import ModelRunner

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SeqUpdate:
    """What one step changed for one sequence."""

    req: Request
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[LogprobEntry] = field(default_factory=list)
    text_delta: str = ""
    finished: bool = False
    error: str | None = None
    pooled: Any = None   # an embedding / scoring request's result (a float32 tensor), when it finishes


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    finished_requests: int = 0


class EngineCore:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.runner = ModelRunner(config)
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, self.runner.encoder_cache,
                                   keep_media_whole=getattr(self.runner.model, "keep_media_whole", False))
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self.structured = StructuredBackend(tokenizer, config.model.vocab_size, tokenizer.eos_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Longest sequence that can ever run: the context length, capped by the whole KV pool."""
        if self.runner.encoder_only:   # no KV pool to cap it
            return self.config.model.max_model_len
        return min(self.config.model.max_model_len, self.runner.num_blocks * self.config.cache.block_size)

    def add_request(self, req: Request) -> None:
        """Admit a request. A constrained one arrives with its grammar matcher (``Engine._prepare``
        makes it on the caller's thread, where a failure is that caller's error)."""
        req.extra["detok"] = IncrementalDetokenizer(
            self.tokenizer, req.prompt_token_ids, skip_special_tokens=req.params.skip_special_tokens,
            stop=req.params.stop, include_stop_str_in_output=req.params.include_stop_str_in_output)
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def warmup(self, decode_steps: int = 3) -> None:
        """Decode a single sequence, then two together, and forget them: with ``compile=True`` both
        compiled decode graphs (one sequence, a batch) then exist before the first real request,
        whose first tokens would otherwise wait for the compiler (~10-25 s), as vLLM warms up too.
        The prompts are shorter than a block, so nothing enters the prefix cache."""
        from mistralpy.sampling_params import SamplingParams

        start = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True).resolved()
        for batch in (1, 2):
            reqs = [Request(f"warmup-{batch}-{i}", [i + 1] * 4, params, self.max_total_tokens)
                    for i in range(batch)]
            for req in reqs:
                self.add_request(req)
            while any(r.finish_reason is None for r in reqs):
                self.step()
        self.stats = EngineStats()
        log.info("warm-up (compiled decode graphs) took %.1fs", time.perf_counter() - start)

    def abort(self, request_id: str) -> list[Request]:
        """Finish a sequence (``id#i``) or every choice of a request (``id``) now, freeing KV blocks."""
        ids = [request_id] if "#" in request_id else [r for r in self.requests if r.startswith(request_id + "#")]
        aborted = []
        for rid in ids:
            req = self.requests.pop(rid, None)
            if req is not None:
                self.scheduler.finish(req, FinishReason.ABORT)
                aborted.append(req)
        return aborted

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[SeqUpdate]:
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return []
        sampled = self.runner.execute(sched)
        self.stats.steps += 1
        updates: list[SeqUpdate] = []
        k = 0
        now = time.monotonic()
        for s in sched.seqs:
            req = s.req
            if req.num_computed_tokens < len(req.prompt_token_ids):
                self.stats.prompt_tokens += min(s.num_new_tokens,
                                                len(req.prompt_token_ids) - req.num_computed_tokens)
            req.num_computed_tokens += s.num_new_tokens
            if req.block_ids:   # (an encoder's embedding request holds none)
                self.kv.commit_computed(req)
            if not s.samples:
                continue
            if req.pooling is not None:   # embedded / scored: done, it keeps no blocks
                updates.append(self._finish_pooling(req))
                continue
            token = sampled.token_ids[k]
            lp = sampled.logprobs[k]
            k += 1
            if req.first_token_time is None:
                req.first_token_time = now
            updates.append(self._append_token(req, token, lp))
        return updates

    def _append_token(self, req: Request, token: int, lp) -> SeqUpdate:
        req.output_token_ids.append(token)
        self.stats.generated_tokens += 1
        update = SeqUpdate(req, new_token_ids=[token])
        if lp is not None:
            entry = LogprobEntry(token, self._token_text(token), lp.logprob,
                                 [TopLogprob(t, self._token_text(t), v) for t, v in lp.top])
            req.logprobs.append(entry)
            update.new_logprobs.append(entry)
        detok: IncrementalDetokenizer = req.extra["detok"]
        params = req.params
        reason, stop_reason = None, None
        n_out = len(req.output_token_ids)
        grammar = req.grammar
        if grammar is not None and not grammar.accept(token):
            # Cannot happen for a token the mask allowed, short of an llguidance inconsistency: the
            # matcher is stopped now, so the request ends here; say why.
            log.warning("request %s: grammar rejected token %d: %s", req.request_id, token, grammar.error())
        if grammar is not None and grammar.is_stopped():
            # The grammar accepted (EOS taken, or nothing may follow): done; an EOS token is not text.
            if token not in req.eos_token_ids:
                detok.push([token])
            reason = FinishReason.STOP
        elif token in params.stop_token_ids and n_out >= params.min_tokens:
            reason, stop_reason = FinishReason.STOP, token
        elif token in req.eos_token_ids and not params.ignore_eos and n_out >= params.min_tokens:
            reason = FinishReason.STOP
        else:
            matched = detok.push([token])
            if matched is not None and n_out >= params.min_tokens:
                reason, stop_reason = FinishReason.STOP, matched
            elif params.max_tokens is not None and n_out >= params.max_tokens:
                reason = FinishReason.LENGTH
            elif req.num_tokens >= self.max_total_tokens:
                reason = FinishReason.LENGTH
        if reason is not None:
            self.scheduler.finish(req, reason, stop_reason)
            self.requests.pop(req.request_id, None)
            self.stats.finished_requests += 1
            update.finished = True
        update.text_delta = detok.take_delta(final=update.finished)
        return update

    def _finish_pooling(self, req: Request) -> SeqUpdate:
        self.scheduler.finish(req, FinishReason.STOP)
        self.requests.pop(req.request_id, None)
        self.stats.finished_requests += 1
        return SeqUpdate(req, finished=True, pooled=req.pooling.result)

    def _token_text(self, token_id: int) -> str:
        texts = self.tokenizer.token_texts()
        return texts[token_id] if 0 <= token_id < len(texts) else ""

    def fail_all(self, error: str) -> list[SeqUpdate]:
        """After an unexpected step failure: finish every request with an error, freeing its blocks."""
        updates = []
        for req in list(self.requests.values()):
            self.scheduler.finish(req, FinishReason.ERROR, None)
            detok: IncrementalDetokenizer = req.extra["detok"]
            updates.append(SeqUpdate(req, text_delta=detok.take_delta(final=True), finished=True, error=error))
        self.requests.clear()
        return updates

    def kv_usage(self) -> float:
        return self.kv.pool.usage()

    def is_running(self, req: Request) -> bool:
        return req.status == RequestStatus.RUNNING
