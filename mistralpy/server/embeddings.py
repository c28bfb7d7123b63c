"""POST /v1/embeddings (OpenAI), /v1/rerank (Cohere / Jina shape, also /rerank and /v2/rerank as vLLM
serves it) and /v1/score (vLLM's text_1 / text_2 shape).

The work runs through the engine's scheduler (mistralpy/embed); bad inputs are 400s with OpenAI's
error body: an empty input, one too long without truncation, an unknown encoding_format, a
`dimensions` the model cannot truncate to, a generation model asked for embeddings.
"""
from __future__ import annotations

import base64
import time
import uuid
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from mistralpy.embed.engine import embed_plan, score_plan
from mistralpy.server.errors import APIError
from mistralpy.server.openapi import bound, error_responses
from mistralpy.server.state import ServerState

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# the documented shape of an input (what the engine checks again: a too long one is still a 400)
Text = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, json_schema_extra=bound("vocab"))]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingRequest(_Body):
    model: str | None = None
    input: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # extensions: vLLM's truncate_prompt_tokens (a token count), or truncate=true (the model's limit);
    # prompt_name: a sentence-transformers prompt ("query", "document", ...)
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)
    truncate: bool = False
    prompt_name: str | None = None


class RerankDocument(_Body):
    text: Text


class RerankRequest(_Body):
    model: str | None = None
    query: Text
    documents: list[Text | RerankDocument] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = True
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)


class ScoreRequest(_Body):
    model: str | None = None
    text_1: Text | Annotated[list[Text], Field(min_length=1)]
    text_2: Text | Annotated[list[Text], Field(min_length=1)]
    truncate_prompt_tokens: int | None = Field(default=None, ge=1)


# ---- response bodies (documentation: the routes return plain dicts, big float lists unvalidated) ----
class Usage(_Body):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(_Body):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 bytes")


class EmbeddingResponse(_Body):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class RerankResult(_Body):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(_Body):
    id: str
    model: str
    results: list[RerankResult]
    usage: Usage


class ScoreData(_Body):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(_Body):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: Usage


def _doc(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model}, **error_responses(400, 404, 503)}


def _truncate(flag: bool, tokens: int | None) -> bool | int:
    return tokens if tokens is not None else flag


def _encode(vector: np.ndarray, fmt: str) -> list[float] | str:
    if fmt == "base64":   # little-endian float32 bytes, as OpenAI's client decodes them
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings", response_model=None, responses=_doc(EmbeddingResponse))
async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    server: ServerState = request.app.state.server
    state = server.model(body.model)
    engine = state.engine
    plan = embed_plan(engine.engine.embedder, body.input, dimensions=body.dimensions,
                      truncate=_truncate(body.truncate, body.truncate_prompt_tokens), prompt_name=body.prompt_name)
    vectors = await engine.run_plan(plan)
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)}
                 for i, v in enumerate(vectors)],
        "model": state.served_name,
        "usage": {"prompt_tokens": plan.num_tokens, "total_tokens": plan.num_tokens},
    }


async def _scores(request: Request, model: str | None, text_1: Any, text_2: Any,
                  truncate: bool | int) -> tuple[Any, list[float], int]:
    server: ServerState = request.app.state.server
    state = server.model(model)
    plan = score_plan(state.engine.engine.embedder, text_1, text_2, truncate)
    return state, await state.engine.run_plan(plan), plan.num_tokens


@router.post("/v1/rerank", response_model=None, responses=_doc(RerankResponse))
@router.post("/v2/rerank", response_model=None, responses=_doc(RerankResponse))
@router.post("/rerank", response_model=None, responses=_doc(RerankResponse))
async def rerank(body: RerankRequest, request: Request) -> dict[str, Any]:
    docs = [d if isinstance(d, str) else d.text for d in body.documents]
    if not docs:
        raise APIError(400, "documents is empty", "documents")
    state, scores, tokens = await _scores(request, body.model, body.query, docs,
                                          _truncate(False, body.truncate_prompt_tokens))
    order = sorted(range(len(docs)), key=lambda i: -scores[i])[:body.top_n or len(docs)]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if body.return_documents:
            item["document"] = {"text": docs[i]}
        results.append(item)
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": state.served_name, "results": results,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@router.post("/v1/score", response_model=None, responses=_doc(ScoreResponse))
@router.post("/score", response_model=None, responses=_doc(ScoreResponse))
async def score(body: ScoreRequest, request: Request) -> dict[str, Any]:
    state, scores, tokens = await _scores(request, body.model, body.text_1, body.text_2,
                                          _truncate(False, body.truncate_prompt_tokens))
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": state.served_name,
            "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
