"""OpenAI-shaped chat completions and streaming chunks built from RequestOutputs."""
from __future__ import annotations

import time
import uuid
from typing import Any

from mistralpy.engine.outputs import CompletionOutput, OpenAIObject, RequestOutput


def new_chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _logprobs(out: CompletionOutput) -> dict[str, Any] | None:
    if out.logprobs is None:
        return None
    return {"content": [e.to_openai() for e in out.logprobs]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          elapsed_s: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens,
                            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if elapsed_s:
        body["completion_tok_per_sec"] = completion_tokens / elapsed_s
    return body


def chat_completion(result: RequestOutput, *, model: str, chat_id: str, created: int,
                    elapsed_s: float | None = None) -> OpenAIObject:
    choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                "logprobs": _logprobs(o), "finish_reason": o.finish_reason}
               for o in result.outputs]
    return OpenAIObject({
        "id": chat_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
        "usage": usage(len(result.prompt_token_ids), result.num_generated_tokens, result.num_cached_tokens,
                       elapsed_s),
    })


def chat_chunk(delta: CompletionOutput, *, model: str, chat_id: str, created: int,
               first: bool) -> OpenAIObject:
    body: dict[str, Any] = {"content": delta.text}
    if first:
        body = {"role": "assistant", **body}
    choice = {"index": delta.index, "delta": body, "logprobs": _logprobs(delta),
              "finish_reason": delta.finish_reason}
    return OpenAIObject({"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [choice]})


def usage_chunk(result: RequestOutput, *, model: str, chat_id: str, created: int) -> OpenAIObject:
    return OpenAIObject({"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": usage(len(result.prompt_token_ids), result.num_generated_tokens,
                                                       result.num_cached_tokens)})


def now() -> int:
    return int(time.time())
