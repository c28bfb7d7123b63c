"""FastAPI app factory: OpenAI-compatible routes on one AsyncEngine or a ModelRegistry of several,
plus health, metrics, tokenizer and model unload/reload endpoints. ``create_app`` does not own the
engines; the caller shuts them down (``registry.shutdown()``)."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.errors import MistralPyError
from mistralpy.server import anthropic, chat, completions, responses
from mistralpy.sampling_params import SamplingParams
from mistralpy.server.errors import APIError, install_error_handlers
from mistralpy.server.mcp_server import MCP_EXPOSE_HEADERS, MCP_PATH, McpEndpoint, mcp_routes
from mistralpy.server.media import fetch_images
from mistralpy.server.middleware import (
    ApiKeyMiddleware,
    BodySizeLimitMiddleware,
    RequestIdMiddleware,
    RequestMetricsMiddleware,
)
from mistralpy.server.middleware import PUBLIC_PATHS
from mistralpy.server.openapi import error_responses, install_openapi
from mistralpy.server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelInfo,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from mistralpy.server.registry import ModelEntry, ModelRegistry
from mistralpy.server.state import ServerState
from mistralpy.server import embeddings as embedding_routes

log = logging.getLogger(__name__)

ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics",
                       "/tokenize", "/detokenize", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
                       MCP_PATH})


@dataclass(slots=True)
class ServerOptions:
    served_model_name: str | None = None   # default: the engine's model id
    api_key: str | None = None             # require "Authorization: Bearer KEY" when set
    cors_origins: tuple[str, ...] = ()     # e.g. ("*",) or ("http://localhost:3000",)
    max_body_bytes: int = 16 * 1024 * 1024
    log_interval_s: float = 5.0            # throughput log line period (0 = off)
    max_media_bytes: int = 20 * 1024 * 1024  # one fetched image / data URL
    allowed_media_domains: tuple[str, ...] = ()  # only these hosts (may be private) when set
    allow_private_media: bool = False      # any host, private addresses included
    max_num_images: int = 8                # per request
    responses_db: str | None = None        # SQLite file of stored /v1/responses (None: in memory, LRU-bounded)
    max_tool_rounds: int = 8               # server-side tool rounds per request (its max_tool_rounds overrides)

    def media_policy(self) -> Any:
        from mistralpy.multimodal.fetch import MediaPolicy

        return MediaPolicy(max_bytes=self.max_media_bytes, allow_private=self.allow_private_media,
                           allowed_domains=frozenset(self.allowed_media_domains) or None)


def create_app(models: AsyncEngine | ModelRegistry, options: ServerOptions | None = None) -> FastAPI:
    """``models``: one engine (served as ``options.served_model_name``) or a registry of several."""
    options = options or ServerOptions()
    registry = (models if isinstance(models, ModelRegistry)
                else ModelRegistry.from_engine(models, options.served_model_name))
    state = ServerState(registry)
    state.options = options
    mcp = McpEndpoint(state)  # /mcp: the models as MCP tools (server/mcp_server.py)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.start_logging(options.log_interval_s)
        async with mcp.run():  # the MCP session manager lives as long as the app
            yield
        registry.stop_logging()

    app = FastAPI(title="mistral.py", description="OpenAI-compatible API of mistral.py", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.include_router(chat.router)
    app.include_router(completions.router)
    app.include_router(anthropic.router)  # /v1/messages: Anthropic's Messages API
    app.include_router(responses.router)
    app.include_router(embedding_routes.router)  # /v1/embeddings, /v1/rerank, /v1/score
    _add_misc_routes(app, state)
    install_openapi(app, api_key=bool(options.api_key), public=PUBLIC_PATHS)
    app.router.routes.extend(mcp_routes(mcp))
    app.state.mcp = mcp
    # add_middleware wraps: the last added runs first. Order of processing: request id, metrics,
    # CORS (preflights answered before auth), API key, body size limit.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=options.max_body_bytes)
    if options.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=options.api_key)
    if options.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(options.cors_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["x-request-id", *MCP_EXPOSE_HEADERS])
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics, endpoints=ENDPOINTS)
    app.add_middleware(RequestIdMiddleware)
    return app


def _add_misc_routes(app: FastAPI, state: ServerState) -> None:
    registry = state.registry

    def card(entry: ModelEntry) -> dict:
        body = ModelCard(id=entry.served_name, created=entry.created,
                         max_model_len=entry.engine.max_total_tokens if entry.engine else None).model_dump()
        body["status"] = "loaded" if entry.loaded else "unloaded"
        body["default"] = entry.served_name == registry.default_name
        mcp = getattr(entry.engine.engine, "mcp", None) if entry.engine is not None else None  # its MCP client
        body["mcp_tools_count"] = len(mcp.tools()) if mcp is not None else 0
        body["mcp_servers_connected"] = mcp.servers_connected if mcp is not None else 0
        return body

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **error_responses()})
    async def list_models() -> dict:
        return {"object": "list", "data": [card(e) for e in registry.entries.values()]}

    @app.get("/v1/models/{model_id:path}", response_model=None,
             responses={200: {"model": ModelInfo}, **error_responses(404)})
    async def get_model(model_id: str) -> dict:
        return card(registry.find(model_id))

    # Admin: free a model's memory / load it again (behind --api-key like every /v1 route).
    @app.post("/v1/models/{model_id:path}/unload", response_model=None,
              responses={200: {"model": ModelInfo}, **error_responses(404)})
    async def unload_model(model_id: str) -> dict:
        return card(await registry.unload(model_id))

    @app.post("/v1/models/{model_id:path}/reload", response_model=None,
              responses={200: {"model": ModelInfo}, **error_responses(404)})
    async def reload_model(model_id: str) -> dict:
        try:
            return card(await registry.reload(model_id))
        except MistralPyError as exc:
            raise APIError(500, f"loading {model_id!r} failed: {exc}", "model", "model_load_error") from exc

    @app.get("/health", response_model=None, responses={
        200: {"model": HealthResponse}, **error_responses(),
        503: {"model": HealthResponse, "description": "An engine is dead (status \"error\")."}})
    async def health() -> JSONResponse:
        models = {name: "loaded" if e.loaded else "unloaded" for name, e in registry.entries.items()}
        dead = {name: e.engine.dead_error for name, e in registry.entries.items() if e.engine and e.engine.dead_error}
        if dead:
            error = dead.get(registry.default_name) or next(iter(dead.values()))
            return JSONResponse({"status": "error", "error": error, "models": models}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.served_name, "models": models})

    @app.get("/metrics", response_class=PlainTextResponse, responses=error_responses())
    async def metrics() -> PlainTextResponse:
        # Engine values come from the default model (or the first loaded one while it is unloaded).
        entry = next((e for e in (registry.default, *registry.entries.values()) if e.loaded), None)
        text = state.metrics.render(entry.engine) if entry is not None else "# no model loaded\n"
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", response_model=None,
              responses={200: {"model": TokenizeResponse}, **error_responses(400, 404, 503)})
    async def tokenize(body: TokenizeRequest) -> dict:
        engine = state.model(body.model).engine
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of 'prompt' and 'messages'", "prompt")
        if body.messages is not None:
            text, _, spec = engine.engine.prepare_chat([m.model_dump(exclude_none=True) for m in body.messages],
                                                       SamplingParams(), add_generation_prompt=body.add_generation_prompt)
            tokens = await engine.tokenize(text, add_special_tokens=False)
            if spec.images:   # counted as the model sees them: each placeholder expanded
                opts = state.options
                images = await fetch_images(spec.images, opts.media_policy(), opts.max_num_images)
                tokens, _ = await asyncio.to_thread(engine.engine.expand_media, tokens, images)
        else:
            tokens = await engine.tokenize(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_total_tokens}

    @app.post("/detokenize", response_model=None,
              responses={200: {"model": DetokenizeResponse}, **error_responses(400, 404, 503)})
    async def detokenize(body: DetokenizeRequest) -> dict:
        engine = state.model(body.model).engine
        vocab = len(engine.tokenizer.token_texts())
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", "tokens")
        return {"text": await engine.detokenize(body.tokens, body.skip_special_tokens)}
