"""FastAPI app factory: OpenAI-compatible routes on one AsyncEngine, plus health, metrics and
tokenizer endpoints. ``create_app`` does not own the engine; the caller shuts it down."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.server import chat, completions
from mistralpy.server.errors import APIError, install_error_handlers
from mistralpy.server.generation import check_model
from mistralpy.server.metrics import ServerMetrics, log_throughput
from mistralpy.server.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
    RequestMetricsMiddleware,
)
from mistralpy.server.protocol import DetokenizeRequest, ModelCard, TokenizeRequest
from mistralpy.server.state import ServerState

log = logging.getLogger(__name__)

ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                       "/tokenize", "/detokenize"})


@dataclass(slots=True)
class ServerOptions:
    served_model_name: str | None = None   # default: the engine's model id
    api_key: str | None = None             # require "Authorization: Bearer KEY" when set
    cors_origins: tuple[str, ...] = ()     # e.g. ("*",) or ("http://localhost:3000",)
    max_body_bytes: int = 16 * 1024 * 1024
    log_interval_s: float = 5.0            # throughput log line period (0 = off)


def create_app(engine: AsyncEngine, options: ServerOptions | None = None) -> FastAPI:
    options = options or ServerOptions()
    state = ServerState(engine, options.served_model_name or engine.model_name, ServerMetrics(engine.model_name))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(log_throughput(engine, options.log_interval_s)) if options.log_interval_s else None
        yield
        if task is not None:
            task.cancel()

    app = FastAPI(title="mistral.py", description="OpenAI-compatible API of mistral.py", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    _add_misc_routes(app, state)
    # add_middleware wraps: the last added runs first. Order of processing: request id, metrics,
    # CORS (preflights answered before auth), API key, body size limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id"])
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics, endpoints=ENDPOINTS)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_misc_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    def card() -> dict:
        return ModelCard(id=state.served_name, created=state.created, max_model_len=engine.max_total_tokens).model_dump()

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        check_model(state.model_names, model_id)
        return card()

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.dead_error:
            return JSONResponse({"status": "error", "error": engine.dead_error}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.served_name})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(state.model_names, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'", "prompt")
        if body.messages is not None:
            text = engine.engine.render_chat([m.model_dump(exclude_none=True) for m in body.messages],
                                             add_generation_prompt=body.add_generation_prompt)
            tokens = await engine.tokenize(text, add_special_tokens=False)
        else:
            tokens = await engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_total_tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(state.model_names, body.model)
        vocab = len(engine.tokenizer.token_texts())
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", "tokens")
        return {"text": await engine.detokenize(body.tokens, body.skip_special_tokens)}
