"""The server's tool loop for POST /v1/chat/completions: tools registered in the server (the
model's MCP tools, ``--tool-dispatch-url``, ``--enable-search``) run inside the request.

Each round is an ordinary chat generation (``prepare_chat``, the guarded image fetcher,
``prepare_prompt``, :class:`Generation`); the round logic (which calls run here, the conversation
carried into the next round, ``tool_choice`` forcing only in the first) is engine/tool_rounds.py,
shared with ``Engine.chat``. Tools the client sends in ``tools`` stay client-side (returned as
``tool_calls``; a client tool shadows a server tool of the same name), and both kinds mix in one
request. ``max_tool_rounds`` (request field, default ``--max-tool-rounds``) bounds the rounds.

The answer carries ``agentic_tool_calls`` ([{round, name, arguments, result, is_error, ...}]) and
``tool_rounds``; ``usage`` sums the rounds. A stream shows each server-side call as it starts and
ends: a named SSE event ``agentic_tool_call_progress`` (a chunk-shaped body with no choices and an
``agentic_tool_call_progress`` field: round, index, name, arguments, status started / completed,
result) and, on completion, a ``delta`` chunk with ``delta.agentic_tool_calls``; the model's own
tool-call deltas of a server-side call are not forwarded (the client must not run it), nor is
that round's ``finish_reason``. Then the final answer's deltas. A client that goes away cancels
the current round's generation (aborted in the engine) and pending tool calls.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from mistralpy.engine import openai_format as oai
from mistralpy.engine.tool_rounds import Rounds, ServerTools, ToolContext, sum_usage
from mistralpy.server.errors import APIError
from mistralpy.server.generation import (
    SSE_DONE,
    Generation,
    error_event,
    prepare_prompt,
    sse_event,
)
from mistralpy.server.media import fetch_images
from mistralpy.server.protocol import ChatCompletionRequest
from mistralpy.server.registry import ModelEntry
from mistralpy.server.state import ServerState

PROGRESS_EVENT = "agentic_tool_call_progress"
_SEARCH_SIZES = ("low", "medium", "high")


def server_tools_for(entry: ModelEntry, body: ChatCompletionRequest) -> ServerTools | None:
    """The model's server-side tools when this request runs the tool loop, else None."""
    tools: ServerTools | None = getattr(entry.engine.engine, "server_tools", None)
    if not tools or body.n != 1:
        return None  # one conversation to continue: n > 1 requests run without server tools
    return tools


class ServerToolLoop:
    """One chat request's rounds (see the module docstring)."""

    def __init__(self, server: ServerState, entry: ModelEntry, body: ChatCompletionRequest,
                 messages: list[dict[str, Any]], tools: ServerTools) -> None:
        max_rounds = body.max_tool_rounds if body.max_tool_rounds is not None else \
            getattr(server.options, "max_tool_rounds", 8)
        if max_rounds < 0:
            raise APIError(400, "max_tool_rounds must be >= 0", "max_tool_rounds")
        size = (body.web_search_options or {}).get("search_context_size", "medium")
        if size not in _SEARCH_SIZES:
            raise APIError(400, "web_search_options.search_context_size must be low, medium or high",
                           "web_search_options")
        self.server, self.entry, self.body = server, entry, body
        self.engine = entry.engine
        chat = {"tools": body.tools, "tool_choice": body.tool_choice, "add_generation_prompt": body.add_generation_prompt,
                "chat_template_kwargs": body.chat_template_kwargs, "enable_thinking": body.enable_thinking,
                "reasoning_effort": body.reasoning_effort, "parallel_tool_calls": body.parallel_tool_calls}
        client_names = frozenset(t.get("function", {}).get("name") for t in body.tools or [] if isinstance(t, dict))
        self.rounds = Rounds(messages, chat, tools, max_rounds, client_names=client_names)
        eng = self.engine.engine
        self.ctx = ToolContext(vision=eng.media is not None, policy=server.options.media_policy(),
                               search_context_size=size,
                               count_tokens=lambda text: len(eng.tokenize(text, add_special_tokens=False)))
        self.params = body.to_sampling_params()
        self.usages: list[dict[str, Any]] = []
        self.chat_id, self.created = oai.new_chat_id(), oai.now()

    async def prepare_round(self) -> tuple[Generation, Any]:
        """The next round's generation (not started) and its ChatSpec."""
        opts = self.server.options
        text, params, spec = self.engine.engine.prepare_chat(self.rounds.messages, self.params, **self.rounds.chat)
        images = None
        if spec.images:  # the conversation's images (and MCP image results) through the guarded fetcher
            images = await fetch_images(spec.images, opts.media_policy(), opts.max_num_images)
        prepared = prepare_prompt(self.engine, text, params, add_special_tokens=False,
                                  truncate=self.body.truncate_sequence, images=images)
        return Generation(self.engine, self.entry.metrics, [prepared]), spec

    def _finish(self, body: dict[str, Any]) -> dict[str, Any]:
        body["usage"] = sum_usage(self.usages)
        body["tool_rounds"] = self.rounds.round
        body["agentic_tool_calls"] = self.rounds.executed
        return body

    # ---- whole answers ---------------------------------------------------------------------------
    async def run(self, first: tuple[Generation, Any]) -> dict[str, Any]:
        gen, spec = first
        while True:
            await gen.run()
            self.usages.append(gen.usage())
            result = oai.chat_completion(gen.prepared[0][0].snapshot(), model=self.entry.served_name,
                                         chat_id=self.chat_id, created=self.created, spec=spec).model_dump()
            if gen.error:  # engine failure: 500, with whatever was generated before it
                raise APIError(500, gen.error, code="engine_error", extra={"partial": self._finish(result)})
            message = result["choices"][0]["message"]
            calls = list(message.get("tool_calls") or [])
            here, client = self.rounds.split(calls)
            if not here:
                return self._finish(result)
            outcomes = await self.rounds.execute(here, self.ctx)
            if client:  # a mixed round: the server-side calls ran, the client runs the rest
                message["tool_calls"] = client
                return self._finish(result)
            self.rounds.extend(message, here, outcomes)
            gen, spec = await self.prepare_round()

    # ---- streams ---------------------------------------------------------------------------------
    async def stream(self, first: tuple[Generation, Any]) -> AsyncIterator[str]:
        gen, spec = first
        try:
            while True:
                relay = _CallRelay(self.rounds, forward_all=self.rounds.round >= self.rounds.max_rounds)
                chunker = oai.ChatChunker(spec, model=self.entry.served_name, chat_id=self.chat_id,
                                          created=self.created)
                async with aclosing(gen.deltas()) as deltas:  # closed at once when the client goes away
                    async for _, delta in deltas:
                        if delta.finish_reason == "error":
                            continue  # reported below as an error event
                        for chunk in chunker.chunks(delta):
                            out = relay.filter(chunk.model_dump())
                            if out is not None:
                                yield sse_event(out)
                self.usages.append(gen.usage())
                if gen.error:
                    yield error_event(gen.error)
                    yield SSE_DONE
                    return
                here, client = relay.split()
                if here:
                    async for event in self._run_streamed(here):
                        yield event
                if relay.held is not None and client:  # the round's finish (tool_calls), for the client's calls
                    yield sse_event(relay.held)
                if not here or client:
                    break
                self.rounds.extend(relay.message(), here, self._outcomes)
                gen, spec = await self.prepare_round()
        except Exception as exc:  # noqa: BLE001 - the response has started: report in-band
            yield error_event(exc)
            yield SSE_DONE
            return
        final = self._finish({"id": self.chat_id, "object": "chat.completion.chunk", "created": self.created,
                              "model": self.entry.served_name, "choices": []})
        if not self.body.include_usage:
            final.pop("usage")
        yield sse_event(final)
        yield SSE_DONE

    async def _run_streamed(self, calls: list[dict[str, Any]]) -> AsyncIterator[str]:
        """Run one round's server-side calls, yielding their progress as it happens."""
        import asyncio

        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def progress(status: str, entry: dict[str, Any], index: int) -> None:
            info = {**entry, "index": index, "status": status}
            queue.put_nowait(self._named(info))
            if status == "completed":
                queue.put_nowait(sse_event(self._chunk({"agentic_tool_calls": [entry]})))

        async def work() -> None:
            try:
                self._outcomes = await self.rounds.execute(calls, self.ctx, progress)
            finally:
                queue.put_nowait(None)

        task = asyncio.ensure_future(work())
        try:
            while (item := await queue.get()) is not None:
                yield item
            await task  # re-raises a failure
        finally:
            if not task.done():  # the client went away: pending calls are cancelled
                task.cancel()
                await asyncio.wait({task})

    def _chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.chat_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.entry.served_name,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

    def _named(self, info: dict[str, Any]) -> str:
        body = {"id": self.chat_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.entry.served_name, "choices": [], PROGRESS_EVENT: info}
        return f"event: {PROGRESS_EVENT}\ndata: {json.dumps(body, ensure_ascii=False, default=str)}\n\n"


class _CallRelay:
    """One streamed round's chunks on their way to the client: tool-call deltas of calls that run
    here are held back (the first delta of a call names it), the client's calls are renumbered
    from 0, and a ``tool_calls`` finish is held while any call runs here."""

    def __init__(self, rounds: Rounds, forward_all: bool) -> None:
        self.rounds, self.forward_all = rounds, forward_all
        self.calls: dict[int, dict[str, Any]] = {}
        self.content: list[str] = []
        self.side: dict[int, bool] = {}           # call index -> runs here
        self.renumber: dict[int, int] = {}        # the client's call index -> index it sees
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.held: dict[str, Any] | None = None

    def filter(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        from mistralpy.engine.tool_rounds import accumulate

        choice = chunk["choices"][0]
        delta = choice["delta"]
        accumulate(delta, self.content, self.calls)
        if self.forward_all:
            return chunk
        parts = []
        for part in delta.get("tool_calls") or []:
            parts += self._route(part)
        out_delta = {k: v for k, v in delta.items() if k != "tool_calls"}
        if parts:
            out_delta["tool_calls"] = parts
        elif "tool_calls" in delta and not any(v for k, v in out_delta.items() if k != "role"):
            out_delta = {}
        if choice.get("finish_reason") == "tool_calls" and any(self.side.values()):
            self.held = {**chunk, "choices": [{**choice, "delta": {}, "logprobs": None}]}
            choice = {**choice, "finish_reason": None}
        if not out_delta and choice.get("finish_reason") is None and choice.get("logprobs") is None:
            return None
        return {**chunk, "choices": [{**choice, "delta": out_delta or {"content": ""}}]}

    def _route(self, part: dict[str, Any]) -> list[dict[str, Any]]:
        i = part["index"]
        if i not in self.side:
            name = self.calls[i]["function"]["name"]
            if not name:  # not named yet: wait
                self.pending.setdefault(i, []).append(part)
                return []
            self.side[i] = self.rounds.server_side(name)
            if not self.side[i]:
                self.renumber[i] = len(self.renumber)
            parts = self.pending.pop(i, []) + [part]
        else:
            parts = [part]
        if self.side[i]:
            return []
        return [{**p, "index": self.renumber[i]} for p in parts]

    def split(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        calls = [self.calls[i] for i in sorted(self.calls)]
        if self.forward_all:
            return [], calls
        return self.rounds.split(calls)

    def message(self) -> dict[str, Any]:
        return {"role": "assistant", "content": "".join(self.content) or None}
