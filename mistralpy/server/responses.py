"""The OpenAI Responses API: POST /v1/responses (plain, streamed with named events, or in the
background), GET / DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel.

A request becomes a chat request (responses_format.py) and runs through the chat route's own
machinery: ``prepare_chat`` (template, tools, reasoning, grammar), the guarded image fetcher,
``prepare_prompt`` and :class:`Generation`. Stored responses live in a :class:`ResponseStore`.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from mistralpy.server import responses_format as fmt
from mistralpy.server.errors import APIError, to_api_error
from mistralpy.server.generation import Generation, SSEResponse, prepare_prompt, until_disconnect
from mistralpy.server.media import fetch_images
from mistralpy.server import openapi as doc
from mistralpy.server.openapi import error_responses, json_or_sse
from mistralpy.server.protocol import OutputLength, _SamplingFields
from mistralpy.server.responses_store import ResponseStore
from mistralpy.server.state import ServerState

router = APIRouter()


class ResponsesRequest(_SamplingFields):
    """POST /v1/responses. Sampling extensions (top_k, min_p, repetition_penalty, dry_*, grammar, ...)
    come from the chat fields; ``max_output_tokens`` is the output limit."""

    input: Annotated[str | list[Any], doc.documented(doc.RESPONSES_INPUT)]  # [] refused by normalize_input
    instructions: str | None = None
    tools: Annotated[list[Any] | None, doc.documented(doc.RESPONSES_TOOLS)] = None
    tool_choice: Annotated[str | dict[str, Any] | None, doc.documented(doc.RESPONSES_TOOL_CHOICE)] = None
    parallel_tool_calls: bool = True
    text: Annotated[dict[str, Any] | None, doc.documented(doc.RESPONSES_TEXT)] = None
    reasoning: Annotated[dict[str, Any] | None, doc.documented(doc.RESPONSES_REASONING)] = None
    max_output_tokens: OutputLength | None = None
    store: bool = True
    previous_response_id: str | None = None
    background: bool = False
    metadata: Annotated[dict[str, str] | None, doc.documented(doc.RESPONSES_METADATA)] = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class ResponseObject(_Out):
    """The response object (responses_format.base_response; documentation only)."""

    id: str
    object: Literal["response"]
    created_at: float
    status: Literal["in_progress", "completed", "incomplete", "failed", "cancelled", "queued"]
    model: str
    output: list[dict[str, Any]]  # message / reasoning / function_call items
    error: dict[str, Any] | None
    usage: dict[str, Any] | None


class ResponseDeleted(_Out):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class InputItemList(_Out):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


@dataclass(slots=True)
class ResponsesService:
    """One app's store and its running background responses."""

    store: ResponseStore
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)


def service(app: FastAPI) -> ResponsesService:
    svc = getattr(app.state, "responses", None)
    if svc is None:  # made on first use, so create_app needs no more than include_router
        options = app.state.server.options
        svc = app.state.responses = ResponsesService(ResponseStore(getattr(options, "responses_db", None)))
    return svc


@dataclass(slots=True)
class _Run:
    """One response being generated: its generation, output builder and storage."""

    gen: Generation
    builder: fmt.OutputBuilder
    engine: Any
    store: ResponseStore | None
    ended: bool = False

    @property
    def response(self) -> dict[str, Any]:
        return self.builder.response

    def feed_all(self) -> None:
        """Non-streamed: the whole output through the builder at once (same path as streaming)."""
        self.builder.feed(self.gen.prepared[0][0].snapshot().outputs[0].text)

    def end(self, status: str | None = None, message: str | None = None, emit: bool = True) -> list[dict[str, Any]]:
        """Close the response (status from the output unless given), store it; the closing events."""
        self.ended = True
        out = self.gen.prepared[0][0].snapshot()
        if status is None:
            status = ("failed" if self.gen.error else
                      "incomplete" if out.outputs[0].finish_reason == "length" else "completed")
            message = self.gen.error
        reasoning = self.builder.reasoning_text()
        usage = fmt.usage(len(out.prompt_token_ids), out.num_generated_tokens, out.num_cached_tokens,
                          len(self.engine.engine.tokenize(reasoning, False)) if reasoning else 0)
        error = {"code": "server_error", "message": message or "generation failed"} if status == "failed" else None
        events = self.builder.finish(status, usage_body=usage, error=error, emit=emit)
        if self.store is not None:
            self.store.put(self.response)
        return events


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if metadata and (len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items())):
        raise APIError(400, "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters", "metadata")


@router.post("/v1/responses", response_model=None,
             responses=json_or_sse(ResponseObject, 400, 404, 503, events="Responses' named events",
                                   named=True))
async def create_response(body: ResponsesRequest, request: Request) -> JSONResponse | SSEResponse:
    server: ServerState = request.app.state.server
    svc = service(request.app)
    entry = server.model(body.model)  # 404 unknown model, 503 unloaded
    engine = entry.engine
    if body.background and not body.store:
        raise APIError(400, "background responses need store=true", "background")
    if body.background and body.stream:
        raise APIError(400, "streaming a background response is not supported; poll GET /v1/responses/{id}",
                       "background")
    _check_metadata(body.metadata)
    context = svc.store.conversation(body.previous_response_id) if body.previous_response_id else []
    items = fmt.normalize_input(body.input)
    tools = fmt.chat_tools(body.tools)
    tool_choice, tools = fmt.chat_tool_choice(body.tool_choice, tools)
    response_format, text_echo = fmt.text_format(body.text)
    effort, thinking = fmt.reasoning_options(body.reasoning)
    body.response_format = response_format or body.response_format
    max_tokens = body.max_output_tokens if body.max_output_tokens is not None else body.max_tokens
    params = body.sampling_params(logprobs=False, top_logprobs=0, max_tokens=max_tokens, n=1)
    text, params, spec = engine.engine.prepare_chat(
        fmt.to_messages(context + items, body.instructions), params, tools=tools, tool_choice=tool_choice,
        chat_template_kwargs=body.chat_template_kwargs, reasoning_effort=effort,
        enable_thinking=body.enable_thinking if body.enable_thinking is not None else thinking,
        parallel_tool_calls=body.parallel_tool_calls)
    images = None
    if spec.images:  # through the guarded fetcher, before anything runs
        opts = server.options
        images = await fetch_images(spec.images, opts.media_policy(), opts.max_num_images)
    prepared = prepare_prompt(engine, text, params, add_special_tokens=False, images=images,
                              truncate=body.truncate_sequence or body.truncation == "auto")
    response = fmt.base_response(resp_id=fmt.new_id("resp"), model=entry.served_name, body=body,
                                 text_echo=text_echo, tools=body.tools, tool_choice=body.tool_choice)
    run = _Run(Generation(engine, entry.metrics, [prepared]), fmt.OutputBuilder(spec, response), engine,
               svc.store if body.store else None)
    if body.store:
        svc.store.put(response, items, context)
    if body.background:
        task = asyncio.create_task(_background(run))
        svc.tasks[response["id"]] = task
        task.add_done_callback(lambda _: svc.tasks.pop(response["id"], None))
        return JSONResponse(response)
    if body.stream:
        return SSEResponse(_events(run))
    try:
        await until_disconnect(request, run.gen.run())
    except asyncio.CancelledError:  # the client went away: the engine request was aborted
        run.feed_all()
        run.end("cancelled", emit=False)
        raise
    except Exception as exc:
        run.feed_all()
        run.end("failed", to_api_error(exc).message, emit=False)
        raise
    run.feed_all()
    run.end()
    if response["status"] == "failed":
        raise APIError(500, response["error"]["message"], code="engine_error", extra={"response": response})
    return JSONResponse(response)


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


async def _events(run: _Run) -> AsyncIterator[str]:
    for event in run.builder.start():
        yield _sse(event)
    try:
        async with aclosing(run.gen.deltas()) as deltas:  # closed at once when the client goes away
            async for _, delta in deltas:
                if delta.finish_reason == "error":
                    continue  # the response ends failed, below
                for event in run.builder.feed(delta.text):
                    yield _sse(event)
        events = run.end()
    except Exception as exc:  # noqa: BLE001 - the stream has started: end it as response.failed
        events = run.end("failed", to_api_error(exc).message)
    finally:
        if not run.ended:  # closed (disconnect): nobody reads events any more; store what there is
            run.end("cancelled", emit=False)
    for event in events:
        yield _sse(event)


async def _background(run: _Run) -> None:
    try:
        await run.gen.run()
    except asyncio.CancelledError:  # POST .../cancel (or shutdown): the engine request is aborted
        run.feed_all()
        run.end("cancelled")
        return
    except Exception as exc:  # noqa: BLE001 - nobody awaits this task: the stored response says it
        run.feed_all()
        run.end("failed", to_api_error(exc).message)
        return
    run.feed_all()
    run.end()


@router.get("/v1/responses/{resp_id}", response_model=None,
            responses={200: {"model": ResponseObject}, **error_responses(404)})
async def get_response(resp_id: str, request: Request) -> dict[str, Any]:
    return service(request.app).store.get(resp_id)


@router.delete("/v1/responses/{resp_id}", response_model=None,
               responses={200: {"model": ResponseDeleted}, **error_responses(404)})
async def delete_response(resp_id: str, request: Request) -> dict[str, Any]:
    svc = service(request.app)
    await _stop(svc, resp_id)
    svc.store.delete(resp_id)
    return {"id": resp_id, "object": "response.deleted", "deleted": True}


async def _stop(svc: ResponsesService, resp_id: str) -> None:
    task = svc.tasks.get(resp_id)
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task})  # it stores the cancelled response before it ends


@router.post("/v1/responses/{resp_id}/cancel", response_model=None,
             responses={200: {"model": ResponseObject}, **error_responses(400, 404)})
async def cancel_response(resp_id: str, request: Request) -> dict[str, Any]:
    svc = service(request.app)
    body = svc.store.get(resp_id)
    if not body.get("background"):
        raise APIError(400, "only background responses can be cancelled", "response_id")
    await _stop(svc, resp_id)
    body = svc.store.get(resp_id)
    if body["status"] not in fmt.TERMINAL:  # left running by an earlier server process
        body["status"] = "cancelled"
        svc.store.put(body)
    return body


@router.get("/v1/responses/{resp_id}/input_items", response_model=None,
            responses={200: {"model": InputItemList}, **error_responses(400, 404)})
async def list_input_items(resp_id: str, request: Request, after: str | None = Query(None, min_length=1),
                           limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc") -> dict[str, Any]:
    items = service(request.app).store.input_items(resp_id)
    if order == "desc":
        items = items[::-1]
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"after: no input item {after!r} in this response", "after")
        start = ids.index(after) + 1
    page = items[start:start + limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)}

