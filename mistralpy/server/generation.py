"""What chat and text completions share: prompt preparation (with truncate_sequence), running the
prepared prompts of one HTTP request with timing and metrics, SSE responses, disconnect handling.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mistralpy.engine import openai_format as oai
from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.engine.input_processor import Prompt, is_token_ids
from mistralpy.engine.output_tracker import RequestTracker
from mistralpy.engine.outputs import CompletionOutput
from mistralpy.sampling_params import SamplingParams
from mistralpy.server.errors import APIError, error_body, to_api_error
from mistralpy.server.metrics import ServerMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")
Prepared = tuple[RequestTracker, list]


def prepare_prompt(engine: AsyncEngine, prompt: Prompt, params: SamplingParams, *, add_special_tokens: bool,
                   truncate: bool, images: list | None = None) -> Prepared:
    """Validate one prompt. With ``truncate``, a prompt that does not fit keeps its last tokens,
    leaving room for max_tokens (or one token) of output, as mistral.rs's truncate_sequence does."""
    if truncate and not images:  # (a prompt with images is never cut: it could split a placeholder run)
        ids = list(prompt) if is_token_ids(prompt) else engine.engine.tokenize(prompt, add_special_tokens)
        room = engine.max_total_tokens - (params.max_tokens or 1)
        if 0 < room < len(ids):
            log.info("truncate_sequence: prompt of %d tokens cut to its last %d", len(ids), room)
            prompt, add_special_tokens = ids[-room:], False
    return engine.prepare(prompt, params, add_special_tokens, images=images)


@dataclass(slots=True)
class Generation:
    """The prepared prompts of one HTTP request, run together; records TTFT / inter-token latency."""

    engine: AsyncEngine
    metrics: ServerMetrics
    prepared: list[Prepared]
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    _last_by_choice: dict[tuple[int, int], float] = field(default_factory=dict)

    async def deltas(self) -> AsyncIterator[tuple[int, CompletionOutput]]:
        """(prompt index, choice delta) per token. Closing it aborts what is unfinished."""
        self.metrics.in_flight += 1
        try:
            async with aclosing(self.engine.stream_prepared(self.prepared)) as stream:
                async for k, delta in stream:
                    self._record(k, delta)
                    yield k, delta
        finally:
            self.metrics.in_flight -= 1
            if self.first_token is not None:
                self.metrics.e2e.observe((self.last_token or self.first_token) - self.start)
            if not self.finished:  # the client went away: its choices end as aborted
                self.metrics.aborted_requests += 1
                self.metrics.finish_reasons["abort"] += sum(
                    1 for t, _ in self.prepared for o in t.outputs if o.finish_reason is None)

    def _record(self, k: int, delta: CompletionOutput) -> None:
        now = time.perf_counter()
        if delta.token_ids:
            if self.first_token is None:
                self.first_token = now
                self.metrics.ttft.observe(now - self.start)
            prev = self._last_by_choice.get((k, delta.index))
            if prev is not None:
                self.metrics.itl.observe(now - prev)
            self._last_by_choice[(k, delta.index)] = now
            self.last_token = now
        if delta.finish_reason is not None:
            self.metrics.finish_reasons[delta.finish_reason] += 1

    async def run(self) -> None:
        # aclosing: a cancelled run must close deltas() at once (its finally aborts the engine
        # requests); a bare `async for` leaves that to the garbage collector.
        async with aclosing(self.deltas()) as deltas:
            async for _ in deltas:
                pass

    @property
    def finished(self) -> bool:
        return all(t.finished for t, _ in self.prepared)

    @property
    def error(self) -> str | None:
        return next((t.error for t, _ in self.prepared if t.error), None)

    def usage(self) -> dict[str, Any]:
        trackers = [t for t, _ in self.prepared]
        first = self.first_token or time.perf_counter()
        return oai.timed_usage(
            sum(len(t.prompt_token_ids) for t in trackers),
            sum(len(o.token_ids) for t in trackers for o in t.outputs),
            sum(t.num_cached_tokens for t in trackers),
            prompt_time_s=first - self.start, completion_time_s=(self.last_token or first) - first)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first; then cancel it (which aborts its
    requests and frees their KV blocks) and raise CancelledError."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # cancel() only requests it: wait until the task has really stopped (and aborted its
            # requests) before reporting, or task.result() below would race with it.
            await asyncio.wait({task})
    if task.cancelled():
        raise asyncio.CancelledError("client disconnected")
    return task.result()


def sse_event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_event(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return sse_event(error_body(500, exc, code="engine_error"))
    err = to_api_error(exc)
    return sse_event(error_body(err.status, err.message, err.param, err.code))


class SSEResponse(StreamingResponse):
    """Server-sent events that always watch for the client going away: on a disconnect the body
    iterator is cancelled at once (even between tokens, e.g. during a long prefill) and closed,
    which aborts its engine requests. Starlette's own class only notices on the next failed send
    under ASGI 2.4 and leaves the iterator to the garbage collector."""

    def __init__(self, content: AsyncIterator[str], headers: dict[str, str] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:
                log.info("client went away mid-stream")
            finally:
                tg.cancel_scope.cancel()

        async def watch() -> None:
            await self.listen_for_disconnect(receive)
            tg.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(stream)
                tg.start_soon(watch)
        finally:
            close: Callable[[], Awaitable[None]] | None = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def check_model(names: set[str], requested: str | None) -> None:
    """404 unless the request names a served model (or none, or "default")."""
    if requested and requested not in names:
        raise APIError(404, f"the model {requested!r} does not exist (served: {sorted(names - {'default'})})",
                       "model", "model_not_found")
