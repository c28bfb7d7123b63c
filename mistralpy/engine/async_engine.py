"""AsyncEngine: the Engine's calls as coroutines / async iterators, for servers.

All requests from all tasks share the Engine's one background step loop; updates cross from
the loop thread into asyncio through ``call_soon_threadsafe``. Cancelling a task (a client
disconnect) aborts its request and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from mistralpy.engine import openai_format as oai
from mistralpy.engine.core import SeqUpdate
from mistralpy.engine.input_processor import Prompt, is_token_ids
from mistralpy.engine.llm_engine import Engine, sampling_from_kwargs
from mistralpy.engine.output_tracker import RequestTracker
from mistralpy.engine.outputs import CompletionOutput, OpenAIObject, RequestOutput
from mistralpy.errors import InvalidRequestError
from mistralpy.sampling_params import SamplingParams


class AsyncEngine:
    def __init__(self, model: str | None = None, *, engine: Engine | None = None, **options: Any) -> None:
        if engine is None:
            if model is None:
                raise InvalidRequestError("AsyncEngine needs a model or an engine", "model")
            engine = Engine(model, **options)
        self.engine = engine

    @classmethod
    def from_engine(cls, engine: Engine) -> AsyncEngine:
        return cls(engine=engine)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special_tokens)

    async def detokenize(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.engine.detokenize(token_ids, skip_special_tokens)

    async def _updates(self, tracker: RequestTracker, reqs: list) -> AsyncIterator[SeqUpdate]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[SeqUpdate] = asyncio.Queue()
        self.engine.loop.submit(reqs, lambda u: loop.call_soon_threadsafe(q.put_nowait, u))
        try:
            while not tracker.finished:
                try:
                    update = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    self.engine._check_alive()
                    continue
                yield update
        finally:
            if not tracker.finished:
                self.engine.loop.abort([r.request_id for r in reqs])

    async def generate_stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                              add_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        """Async iterator of per-token deltas (one choice each), like Engine.generate_stream."""
        tracker, reqs = self.engine._prepare(prompt, sampling_params, add_special_tokens)
        async for update in self._updates(tracker, reqs):
            yield tracker.delta_output(tracker.apply(update))

    async def generate_one(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                           add_special_tokens: bool = True) -> RequestOutput:
        tracker, reqs = self.engine._prepare(prompt, sampling_params, add_special_tokens)
        async for update in self._updates(tracker, reqs):
            tracker.apply(update)
        return tracker.snapshot()

    async def generate(self, prompts: Prompt | Sequence[Prompt],
                       sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or is_token_ids(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        params = list(sampling_params) if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError("need one SamplingParams per prompt", "sampling_params")
        return list(await asyncio.gather(*(self.generate_one(p, sp) for p, sp in zip(prompts, params))))

    async def chat(self, messages: Sequence[dict[str, Any]], *, stream: bool = False, tools: list[dict] | None = None,
                   tool_choice: Any = None, add_generation_prompt: bool = True,
                   chat_template_kwargs: dict[str, Any] | None = None, enable_thinking: bool | None = None,
                   reasoning_effort: str | None = None, sampling_params: SamplingParams | None = None,
                   stream_options: dict[str, Any] | None = None, parallel_tool_calls: bool = True,
                   tool_callbacks: dict[str, Any] | None = None, max_tool_rounds: int = 8,
                   **sampling: Any) -> OpenAIObject | AsyncIterator[OpenAIObject]:
        """Awaitable chat completion; with stream=True, an async iterator of chunks (see Engine.chat).

        With ``tool_callbacks`` the rounds run Engine.chat's tool loop on a worker thread (the tools
        are plain callables that may block), so the event loop stays free."""
        if tool_callbacks or getattr(self.engine, "server_tools", None):  # MCP / dispatch / search tools too
            call = lambda: self.engine.chat(  # one call, two ways to run it
                messages, stream=stream, tools=tools, tool_choice=tool_choice,
                add_generation_prompt=add_generation_prompt, chat_template_kwargs=chat_template_kwargs,
                enable_thinking=enable_thinking, reasoning_effort=reasoning_effort, sampling_params=sampling_params,
                stream_options=stream_options, parallel_tool_calls=parallel_tool_calls,
                tool_callbacks=tool_callbacks, max_tool_rounds=max_tool_rounds, **sampling)
            if not stream:
                return await asyncio.to_thread(call)
            return _iterate_in_thread(await asyncio.to_thread(call))
        params = sampling_from_kwargs(sampling, sampling_params)
        text, params, spec = self.engine.prepare_chat(
            messages, params, tools=tools, tool_choice=tool_choice, add_generation_prompt=add_generation_prompt,
            chat_template_kwargs=chat_template_kwargs, enable_thinking=enable_thinking,
            reasoning_effort=reasoning_effort, parallel_tool_calls=parallel_tool_calls)
        tracker, reqs = self.engine._prepare(text, params, add_special_tokens=False, images=spec.images)
        chat_id, created = oai.new_chat_id(), oai.now()
        name = self.engine.model_name
        if stream:
            include_usage = bool((stream_options or {}).get("include_usage"))
            chunker = oai.ChatChunker(spec, model=name, chat_id=chat_id, created=created)
            return self._chat_chunks(tracker, reqs, chunker, include_usage)
        start = time.perf_counter()
        async for update in self._updates(tracker, reqs):
            tracker.apply(update)
        return oai.chat_completion(tracker.snapshot(), model=name, chat_id=chat_id, created=created,
                                   elapsed_s=time.perf_counter() - start, spec=spec)

    async def _chat_chunks(self, tracker: RequestTracker, reqs: list, chunker: oai.ChatChunker,
                           include_usage: bool) -> AsyncIterator[OpenAIObject]:
        async for update in self._updates(tracker, reqs):
            for chunk in chunker.chunks(tracker.apply(update)):
                yield chunk
        if include_usage:
            yield oai.usage_chunk(tracker.snapshot(), model=chunker.model, chat_id=chunker.chat_id,
                                  created=chunker.created)

    # ---- embeddings and scores (mistralpy/embed): awaited on the event loop, run by the engine loop ----
    async def embed(self, inputs: Any, *, dimensions: int | None = None, truncate: bool | int = False,
                    prompt_name: str | None = None, prompt: str | None = None) -> Any:
        """Engine.embed as a coroutine: embeddings [n, d] float32 (numpy)."""
        from mistralpy.embed.engine import embed_plan

        return await self.run_plan(embed_plan(self.engine.embedder, inputs, dimensions=dimensions,
                                              truncate=truncate, prompt_name=prompt_name, prompt=prompt))

    async def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str], *,
                    truncate: bool | int = False) -> list[float]:
        from mistralpy.embed.engine import score_plan

        return await self.run_plan(score_plan(self.engine.embedder, text_1, text_2, truncate))

    async def run_plan(self, plan: Any) -> Any:
        """Run a prepared embedding / scoring plan (mistralpy.embed.engine.Plan); its answer."""
        return plan.finish(await self.engine.embedder.run_async(plan.reqs))

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def shutdown(self) -> None:
        self.engine.shutdown()

    # ---- building blocks for servers ---------------------------------------------------------
    def prepare(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                add_special_tokens: bool = True, images: list | None = None) -> tuple[RequestTracker, list]:
        """Tokenize and validate one prompt without submitting it (raises InvalidRequestError /
        PromptTooLongError / MediaError), so a server can check every prompt of a request before
        running any. ``images``: already fetched sources (bytes), in placeholder order."""
        return self.engine._prepare(prompt, sampling_params, add_special_tokens, images=images)

    async def stream_prepared(self, prepared: Sequence[tuple[RequestTracker, list]]
                              ) -> AsyncIterator[tuple[int, CompletionOutput]]:
        """Submit prepared requests together; yield (index into ``prepared``, choice delta) per token.
        Closing the iterator (or cancelling its task) aborts whatever is unfinished and frees its blocks."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[tuple[int, SeqUpdate]] = asyncio.Queue()
        for k, (_, reqs) in enumerate(prepared):
            self.engine.loop.submit(reqs, lambda u, k=k: loop.call_soon_threadsafe(q.put_nowait, (k, u)))
        try:
            while not all(t.finished for t, _ in prepared):
                try:
                    k, update = await asyncio.wait_for(q.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    self.engine._check_alive()
                    continue
                yield k, prepared[k][0].apply(update)
        finally:
            unfinished = [r.request_id for t, reqs in prepared if not t.finished for r in reqs]
            if unfinished:
                self.engine.loop.abort(unfinished)

    # ---- read-only views for servers (metrics, limits, health) ---------------------------------
    @property
    def max_total_tokens(self) -> int:
        """Longest prompt + output a request may have (context length capped by the KV pool)."""
        return self.engine.inputs.max_total_tokens

    @property
    def dead_error(self) -> str | None:
        """Why the engine loop stopped, or None while it runs."""
        return self.engine.loop.dead_error

    def metrics_snapshot(self) -> dict[str, float]:
        """Engine counters and gauges for /metrics. Read from another thread without locking: each
        value is one int/len read, so a scrape may be a step stale but never inconsistent enough to matter."""
        core = self.engine.core
        pool = core.kv.pool
        sched = core.scheduler
        return {
            "steps": core.stats.steps, "prompt_tokens": core.stats.prompt_tokens,
            "generation_tokens": core.stats.generated_tokens, "finished_requests": core.stats.finished_requests,
            "running": len(sched.running), "waiting": len(sched.waiting), "preemptions": sched.num_preemptions,
            "kv_blocks_total": pool.num_blocks, "kv_blocks_free": pool.num_free,
            "kv_usage": 1.0 - pool.num_free / pool.num_blocks,
            "prefix_queries": pool.prefix_queries, "prefix_hits": pool.prefix_hits,
        }


async def _iterate_in_thread(it: Any) -> AsyncIterator[Any]:
    """A blocking iterator as an async one: each next() runs on a worker thread."""
    done = object()
    try:
        while (item := await asyncio.to_thread(next, it, done)) is not done:
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            await asyncio.to_thread(close)
