"""POST /v1/chat/completions."""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mistralpy.engine import openai_format as oai
from mistralpy.server.errors import APIError
from mistralpy.server.generation import (
    SSE_DONE,
    Generation,
    SSEResponse,
    error_event,
    prepare_prompt,
    sse_event,
    until_disconnect,
)
from mistralpy.server.media import fetch_images
from mistralpy.server.openapi import json_or_sse
from mistralpy.server.protocol import ChatCompletionRequest, ChatCompletionResponse
from mistralpy.server.state import ServerState
from mistralpy.server.tool_loop import ServerToolLoop, server_tools_for

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None,
             responses=json_or_sse(ChatCompletionResponse, 400, 404, 503, events="chat.completion.chunk events"))
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | SSEResponse:
    server: ServerState = request.app.state.server
    state = server.model(body.model)  # 404 for an unknown model, 503 while it is unloaded
    engine = state.engine
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    tools = server_tools_for(state, body)
    if tools is not None:  # tools that run in the server: rounds in this request (server/tool_loop.py)
        return await _with_server_tools(ServerToolLoop(server, state, body, messages, tools), body, request)
    text, params, spec = engine.engine.prepare_chat(
        messages, body.to_sampling_params(), tools=body.tools, tool_choice=body.tool_choice,
        add_generation_prompt=body.add_generation_prompt, chat_template_kwargs=body.chat_template_kwargs,
        enable_thinking=body.enable_thinking, reasoning_effort=body.reasoning_effort,
        parallel_tool_calls=body.parallel_tool_calls)
    images = None
    if spec.images:  # fetched here, through the guarded fetcher, before anything runs
        opts = server.options
        images = await fetch_images(spec.images, opts.media_policy(), opts.max_num_images)
    # The template already wrote BOS where the model wants it.
    prepared = prepare_prompt(engine, text, params, add_special_tokens=False, truncate=body.truncate_sequence,
                              images=images)
    gen = Generation(engine, state.metrics, [prepared])
    chat_id, created = oai.new_chat_id(), oai.now()
    if body.stream:
        chunker = oai.ChatChunker(spec, model=state.served_name, chat_id=chat_id, created=created)
        return SSEResponse(_chunks(gen, chunker, body.include_usage))
    await until_disconnect(request, gen.run())
    result = oai.chat_completion(prepared[0].snapshot(), model=state.served_name, chat_id=chat_id, created=created,
                                 spec=spec)
    result["usage"] = gen.usage()
    if gen.error:
        # Engine failure: 500, with whatever was generated before it.
        raise APIError(500, gen.error, code="engine_error", extra={"partial": result.model_dump()})
    return JSONResponse(result.model_dump())


async def _with_server_tools(loop: ServerToolLoop, body: ChatCompletionRequest,
                             request: Request) -> JSONResponse | SSEResponse:
    first = await loop.prepare_round()  # a bad request fails here, before any response starts
    if body.stream:
        return SSEResponse(loop.stream(first))
    return JSONResponse(await until_disconnect(request, loop.run(first)))


async def _chunks(gen: Generation, chunker: oai.ChatChunker, include_usage: bool) -> AsyncIterator[str]:
    model, chat_id, created = chunker.model, chunker.chat_id, chunker.created
    tracker = gen.prepared[0][0]
    try:
        async with aclosing(gen.deltas()) as deltas:  # closed at once when the client goes away
            async for _, delta in deltas:
                if delta.finish_reason == "error":
                    continue  # reported below as an error event
                for chunk in chunker.chunks(delta):
                    yield sse_event(chunk.model_dump())
    except Exception as exc:  # noqa: BLE001 - the response has started: report in-band
        yield error_event(exc)
        yield SSE_DONE
        return
    if gen.error:
        yield error_event(gen.error)
    elif include_usage:
        body: dict[str, Any] = oai.usage_chunk(tracker.snapshot(), model=model, chat_id=chat_id,
                                               created=created).model_dump()
        body["usage"] = gen.usage()
        yield sse_event(body)
    yield SSE_DONE
