"""Token-budget scheduler.

Each request has ``num_computed_tokens`` and a target (prompt + output so far). A step has a
token budget (``max_num_batched_tokens``). Running requests go first (a decode token each, or
the next prefill chunk), then waiting ones while the budget, ``max_seqs`` and the KV pool
allow. When blocks run out the newest running request is preempted: its blocks are freed and it
is recomputed later (prefix caching usually makes that cheap). Chunked prefill, prefix-cache
hits and preemption all fall out of this one rule.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

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
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
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
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        chunking = self.config.enable_chunked_prefill

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
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
            if req.num_computed_tokens == 0 and not req.block_ids:
                cached = self.kv.get_computed_blocks(req)
                req.num_computed_tokens = cached
                if req.num_preemptions == 0:
                    req.num_cached_tokens = cached
            remaining = req.num_tokens - req.num_computed_tokens
            if chunking:
                num_new = min(remaining, budget)
            elif remaining <= budget or not out.seqs:
                num_new = remaining  # a prompt longer than the budget still runs, alone
            else:
                break
            if not self.kv.allocate(req, num_new):
                self.kv.free(req)  # give back the prefix blocks it was holding while waiting
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, num_new, req.num_computed_tokens + num_new == req.num_tokens))
            budget -= num_new
        return out
