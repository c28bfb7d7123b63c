"""Token-budget scheduler.

Each request has ``num_computed_tokens`` and a target (prompt + output so far). A step has a
token budget (``max_num_batched_tokens``). Running requests go first (a decode token each, or
the next prefill chunk), then waiting ones while the budget, ``max_seqs`` and the KV pool
allow. When blocks run out the newest running request is preempted: its blocks are freed and it
is recomputed later (prefix caching usually makes that cheap). Chunked prefill, prefix-cache
hits and preemption all fall out of this one rule.

Media (multimodal requests) add a second budget per step, in encoder output rows: a chunk that
would start encoding more images than the budget allows ends just before the first image that does
not fit (it runs in a later step); an image larger than the whole budget runs alone.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mistralpy.config import SchedulerConfig
from mistralpy.core.kv_manager import KVCacheManager
from mistralpy.core.request import FinishReason, Request, RequestStatus

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledSeq:
    req: Request
    num_new_tokens: int
    samples: bool  # this step completes the request's known tokens, so its next token is sampled


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, encoder_cache: Any = None,
                 keep_media_whole: bool = False) -> None:
        self.config = config
        self.kv = kv
        self.encoder_cache = encoder_cache   # multimodal.encoder_cache.EncoderCache, for media models
        # a model whose media placeholders attend to each other (Gemma 3's bidirectional image runs)
        # needs each item's placeholders computed in one step: chunks never end inside one
        self.keep_media_whole = keep_media_whole
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, req: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        """Remove a request from its queue and free its blocks at once."""
        if req.status == RequestStatus.FINISHED:
            return
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self._release_media(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        self._release_media(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _release_media(self, req: Request) -> None:
        if self.encoder_cache is not None and req.mm_items:
            self.encoder_cache.release(req.request_id)

    def _fit_media(self, req: Request, num_new: int, enc: list[int], chunking: bool) -> int:
        """num_new, or fewer so that the images this chunk must encode fit the step's encoder budget
        ``enc[0]`` (rows left; charged here). 0: nothing of this request can run this step."""
        if self.encoder_cache is None or not req.mm_items:
            return num_new
        start = req.num_computed_tokens
        end = start + num_new
        first = enc[0] == self.config.max_num_batched_tokens  # no encoder work scheduled yet
        for item in req.mm_items:                          # in prompt order
            r = item.placeholder
            if r.offset >= end or r.offset + r.length <= start or item.hash in self.encoder_cache:
                continue
            if item.num_embeds <= enc[0] or first:
                enc[0] -= item.num_embeds
                first = False
                continue
            if chunking and r.offset > start:
                return r.offset - start                    # stop before this image
            return 0
        return num_new

    def _whole_media(self, req: Request, num_new: int, budget: int) -> int:
        """num_new, moved so that the chunk does not end inside a media item (``keep_media_whole``):
        cut before the item, or, when the chunk starts at (or inside) it, stretched to its end if
        that fits ``budget`` or could never fit a step (then it overshoots the budget). 0: wait."""
        if not self.keep_media_whole or not req.mm_items:
            return num_new
        start = req.num_computed_tokens
        end = start + num_new
        for item in req.mm_items:
            lo = item.placeholder.offset
            hi = lo + item.placeholder.length
            if not lo < end < hi:
                continue
            if lo > start:
                return lo - start
            need = hi - start
            return need if need <= budget or need > self.config.max_num_batched_tokens else 0
        return num_new

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunking = self.config.enable_chunked_prefill
        enc = [budget]   # encoder rows left this step

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._fit_media(req, min(req.num_tokens - req.num_computed_tokens, budget), enc, True)
            num_new = self._whole_media(req, num_new, budget)
            if num_new <= 0:
                i += 1
                continue
            while not self.kv.allocate(req, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break  # req preempted itself: nothing after it can fit either
            out.seqs.append(ScheduledSeq(req, num_new, req.num_computed_tokens + num_new == req.num_tokens))
            budget -= num_new
            i += 1

        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_seqs:
            req = self.waiting[0]
            # an encoder's embedding request runs whole in one step and holds no KV blocks
            whole = req.pooling is not None and req.pooling.no_kv
            if req.num_computed_tokens == 0 and not req.block_ids and (req.pooling is None or req.pooling.prefix_cacheable):
                cached = self.kv.get_computed_blocks(req)
                req.num_computed_tokens = cached
                if req.num_preemptions == 0:
                    req.num_cached_tokens = cached
            remaining = req.num_tokens - req.num_computed_tokens
            if chunking and not whole:
                num_new = min(remaining, budget)
            elif remaining <= budget or not out.seqs:
                num_new = remaining  # a prompt longer than the budget still runs, alone
            else:
                break
            num_new = self._whole_media(req, self._fit_media(req, num_new, enc, chunking), budget)
            if num_new <= 0:
                break
            if not whole and not self.kv.allocate(req, num_new):
                self.kv.free(req)  # give back the prefix blocks it was holding while waiting
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, num_new, req.num_computed_tokens + num_new == req.num_tokens))
            budget -= num_new
        return out
