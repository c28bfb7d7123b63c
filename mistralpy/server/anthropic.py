"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the engine's chat
machinery (the same prompt preparation, generation and output parsing as /v1/chat/completions;
the conversion lives in anthropic_format.py). Errors on these paths take Anthropic's shape
(errors.py picks it by path)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.engine.chat_output import ChatSpec
from mistralpy.engine.output_tracker import RequestTracker
from mistralpy.engine.outputs import CompletionOutput
from mistralpy.sampling_params import SamplingParams
from mistralpy.server import anthropic_format as af
from mistralpy.server.errors import APIError, to_api_error
from mistralpy.server.generation import Generation, SSEResponse, prepare_prompt, until_disconnect
from mistralpy.server.media import fetch_images
from mistralpy.server.openapi import json_or_sse, error_responses
from mistralpy.server.state import ServerState

router = APIRouter()


async def _prompt(server: ServerState, engine: AsyncEngine, chat: af.ChatRequest,
                  params: SamplingParams) -> tuple[str, SamplingParams, ChatSpec, list | None]:
    """(prompt text, params, spec, fetched images): rendered as the OpenAI route renders it, then
    the prefill (a final assistant turn) appended, so the answer continues it."""
    text, params, spec = engine.engine.prepare_chat(chat.messages, params, **chat.prepare_kwargs())
    images = None
    if spec.images:  # fetched through the guarded fetcher before anything runs
        opts = server.options
        images = await fetch_images(spec.images, opts.media_policy(), opts.max_num_images)
    return text + chat.prefill, params, spec, images


@router.post("/v1/messages", response_model=None,
             responses=json_or_sse(af.MessageResponse, 400, 404, 503, anthropic=True,
                                   events="Anthropic's message_start ... message_stop events", named=True))
async def create_message(body: af.MessagesRequest, request: Request) -> JSONResponse | SSEResponse:
    server: ServerState = request.app.state.server
    state = server.model(body.model)  # 404 for an unknown model, 503 while it is unloaded
    engine = state.engine
    chat = af.to_chat_request(body)
    text, params, spec, images = await _prompt(server, engine, chat, body.to_sampling_params())
    # The template already wrote BOS where the model wants it.
    prepared = prepare_prompt(engine, text, params, add_special_tokens=False, truncate=False, images=images)
    gen = Generation(engine, state.metrics, [prepared])
    msg_id, stops = af.new_message_id(), list(body.stop_sequences or [])
    if body.stream:
        events = af.MessageEvents(spec, msg_id=msg_id, model=state.served_name, stop_sequences=stops)
        return SSEResponse(_events(gen, events))
    await until_disconnect(request, gen.run())
    if gen.error:
        raise APIError(500, gen.error, code="engine_error")
    result = prepared[0].snapshot()
    out = result.outputs[0]
    message, called = spec.message(out.text)
    stop, sequence = af.stop_reason(out.finish_reason, out.stop_reason, called, stops)
    return JSONResponse(af.message_body(msg_id=msg_id, model=state.served_name, content=af.content_blocks(message),
                                        stop=stop, stop_sequence=sequence, input_tokens=len(result.prompt_token_ids),
                                        output_tokens=result.num_generated_tokens))


async def _events(gen: Generation, events: af.MessageEvents) -> AsyncIterator[str]:
    tracker: RequestTracker = gen.prepared[0][0]
    for event in events.start(len(tracker.prompt_token_ids)):
        yield event
    last: CompletionOutput | None = None
    try:
        async with aclosing(gen.deltas()) as deltas:  # closed at once when the client goes away
            async for _, delta in deltas:
                if delta.finish_reason == "error":
                    continue  # reported below as an error event
                for event in events.feed(delta.text, delta.finish_reason is not None):
                    yield event
                if delta.finish_reason is not None:
                    last = delta
    except Exception as exc:  # noqa: BLE001 - the response has started: report in-band
        err = to_api_error(exc)
        yield af.error_sse(err.status, err.message)
        return
    if gen.error:
        yield af.error_sse(500, gen.error)
        return
    output_tokens = sum(len(o.token_ids) for o in tracker.outputs)
    reason, stopped_by = (last.finish_reason, last.stop_reason) if last is not None else (None, None)
    for event in events.finish(reason, stopped_by, output_tokens):
        yield event


@router.post("/v1/messages/count_tokens", responses=error_responses(400, 404, 503, anthropic=True))
async def count_tokens(body: af.CountTokensRequest, request: Request) -> af.CountTokensResponse:
    """The prompt's tokens as /v1/messages would run it: images expanded as the model sees them."""
    server: ServerState = request.app.state.server
    engine = server.model(body.model).engine
    text, _, _, images = await _prompt(server, engine, af.to_chat_request(body), SamplingParams())
    tokens = await engine.tokenize(text, add_special_tokens=False)
    if images:
        tokens, _ = await asyncio.to_thread(engine.engine.expand_media, tokens, images)
    return af.CountTokensResponse(input_tokens=len(tokens))
