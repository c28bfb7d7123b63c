"""POST /v1/completions (legacy text completions): prompt as text, token ids or a list of either;
echo, suffix (fill-in-the-middle when the vocabulary has FIM tokens), best_of."""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mistralpy.engine import openai_format as oai
from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.engine.input_processor import Prompt, is_token_ids
from mistralpy.engine.outputs import CompletionOutput
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
from mistralpy.server.openapi import json_or_sse
from mistralpy.server.protocol import CompletionRequest, CompletionResponse
from mistralpy.server.state import ServerState

router = APIRouter()

# (prefix, suffix, middle) token spellings of the common FIM vocabularies (StarCoder, Qwen, CodeLlama).
_FIM_TOKENS = (("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
               ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
               ("<PRE>", "<SUF>", "<MID>"))


def _prompts(prompt: str | list) -> list[Prompt]:
    if isinstance(prompt, str) or is_token_ids(prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be an empty list", "prompt")
    return list(prompt)


def _fim(engine: AsyncEngine, prompt: Prompt, suffix: str) -> str:
    """Fill-in-the-middle prompt; 400 when the model has no FIM tokens or the prompt is token ids."""
    if not isinstance(prompt, str):
        raise APIError(400, "suffix needs text prompts", "suffix")
    tok = engine.tokenizer
    for pre, suf, mid in _FIM_TOKENS:
        if all(tok.token_to_id(t) is not None for t in (pre, suf, mid)):
            return f"{pre}{prompt}{suf}{suffix}{mid}"
    raise APIError(400, "suffix is not supported: this model's vocabulary has no fill-in-the-middle tokens",
                   "suffix", "unsupported_parameter")


def _best(outputs: Sequence[CompletionOutput], n: int) -> list[CompletionOutput]:
    """The n outputs with the highest cumulative logprob (best_of)."""
    if len(outputs) <= n:
        return list(outputs)
    return sorted(outputs, key=lambda o: sum(e.logprob for e in o.logprobs or ()), reverse=True)[:n]


@router.post("/v1/completions", response_model=None,
             responses=json_or_sse(CompletionResponse, 400, 404, 503, events="text_completion chunks"))
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | SSEResponse:
    server: ServerState = request.app.state.server
    state = server.model(body.model)  # 404 for an unknown model, 503 while it is unloaded
    engine = state.engine
    prompts = _prompts(body.prompt)
    n = body.n
    best_of = body.best_of if body.best_of is not None else n
    if best_of < n:
        raise APIError(400, f"best_of ({best_of}) must be >= n ({n})", "best_of")
    if body.stream and best_of > n:
        raise APIError(400, "best_of > n cannot be streamed", "best_of")
    # best_of ranks choices by cumulative logprob, so it needs logprobs even when the client did not ask.
    params = body.sampling_params(logprobs=body.logprobs is not None or best_of > n,
                                  top_logprobs=body.logprobs or 0, max_tokens=body.max_tokens, n=best_of)
    if body.suffix:
        prompts = [_fim(engine, p, body.suffix) for p in prompts]
    prepared = [prepare_prompt(engine, p, params, add_special_tokens=True, truncate=body.truncate_sequence)
                for p in prompts]  # validate every prompt before running any
    echoes = [_echo_text(engine, t.prompt, t.prompt_token_ids) if body.echo else "" for t, _ in prepared]
    gen = Generation(engine, state.metrics, prepared)
    cid, created = oai.new_completion_id(), oai.now()
    if body.stream:
        return SSEResponse(_chunks(gen, body, state.served_name, cid, created, echoes, n))
    await until_disconnect(request, gen.run())
    choices = []
    for k, (tracker, _) in enumerate(prepared):
        for j, out in enumerate(_best(tracker.outputs, n)):
            lp = (oai.completion_logprobs(out.logprobs, len(echoes[k])) if body.logprobs is not None else None)
            choices.append(oai.completion_choice(k * n + j, echoes[k] + out.text, out.finish_reason, lp))
    result = oai.text_completion(choices, model=state.served_name, completion_id=cid, created=created,
                                 usage_body=gen.usage())
    if gen.error:
        raise APIError(500, gen.error, code="engine_error", extra={"partial": result.model_dump()})
    return JSONResponse(result.model_dump())


def _echo_text(engine: AsyncEngine, text: str | None, ids: list[int]) -> str:
    return text if text is not None else engine.engine.detokenize(ids)


async def _chunks(gen: Generation, body: CompletionRequest, model: str, cid: str, created: int,
                  echoes: list[str], n: int) -> AsyncIterator[str]:
    offsets: dict[int, int] = {}  # choice index -> characters sent so far (for logprobs text_offset)
    try:
        async with aclosing(gen.deltas()) as deltas:  # closed at once when the client goes away
            async for k, delta in deltas:
                index = k * n + delta.index
                if delta.finish_reason == "error":
                    continue
                text = delta.text
                if index not in offsets:
                    text = echoes[k] + text
                    offsets[index] = len(echoes[k])
                lp = (oai.completion_logprobs(delta.logprobs, offsets[index]) if body.logprobs is not None else None)
                offsets[index] += len(delta.text)
                choice = oai.completion_choice(index, text, delta.finish_reason, lp)
                chunk = oai.completion_chunk(choice, model=model, completion_id=cid, created=created)
                yield sse_event(chunk.model_dump())
    except Exception as exc:  # noqa: BLE001 - the response has started: report in-band
        yield error_event(exc)
        yield SSE_DONE
        return
    if gen.error:
        yield error_event(gen.error)
    elif body.include_usage:
        yield sse_event(oai.completion_chunk(None, model=model, completion_id=cid, created=created,
                                             usage_body=gen.usage()).model_dump())
    yield SSE_DONE
