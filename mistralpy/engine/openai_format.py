"""OpenAI-shaped chat completions and streaming chunks built from RequestOutputs."""
from __future__ import annotations

import time
import uuid
from typing import Any

from mistralpy.engine.chat_output import ChatSpec, ChoiceStream
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
                    elapsed_s: float | None = None, spec: ChatSpec | None = None) -> OpenAIObject:
    """The whole chat.completion; ``spec`` splits reasoning and tool calls out of each choice's text."""
    choices = []
    for o in result.outputs:
        if spec is None:
            message, called = {"role": "assistant", "content": o.text}, False
        else:
            message, called = spec.message(o.text)
        choices.append({"index": o.index, "message": message, "logprobs": _logprobs(o),
                        "finish_reason": _finish(o.finish_reason, called)})
    return OpenAIObject({
        "id": chat_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
        "usage": usage(len(result.prompt_token_ids), result.num_generated_tokens, result.num_cached_tokens,
                       elapsed_s),
    })


def _finish(reason: str | None, called: bool) -> str | None:
    # A tool call that ended the output (EOS or a completed grammar) reports "tool_calls", as OpenAI does.
    return "tool_calls" if called and reason == "stop" else reason


class ChatChunker:
    """Streams one chat request: each choice's token deltas -> chat.completion.chunk objects.

    With a ``spec`` that parses tools or reasoning, each choice has its own :class:`ChoiceStream`;
    chunks are held back while a parser is deciding (a marker may be starting)."""

    def __init__(self, spec: ChatSpec | None, *, model: str, chat_id: str, created: int) -> None:
        self.spec = spec if spec is not None and not spec.plain else None
        self.model, self.chat_id, self.created = model, chat_id, created
        self._streams: dict[int, ChoiceStream] = {}
        self._started: set[int] = set()

    def chunks(self, delta: CompletionOutput) -> list[OpenAIObject]:
        stream = None
        if self.spec is not None:
            stream = self._streams.get(delta.index)
            if stream is None:
                stream = self._streams[delta.index] = self.spec.stream()
            bodies = stream.feed(delta.text)
            if delta.finish_reason is not None:
                bodies += stream.finish()
        else:
            bodies = [{"content": delta.text}]
        finish = _finish(delta.finish_reason, stream is not None and stream.called)
        logprobs = _logprobs(delta)
        if not bodies:
            if finish is None and logprobs is None:
                return []
            bodies = [{"content": ""}]
        out = []
        last = len(bodies) - 1
        for i, body in enumerate(bodies):
            if delta.index not in self._started:
                self._started.add(delta.index)
                body = {"role": "assistant", **body}
            choice = {"index": delta.index, "delta": body, "logprobs": logprobs if i == 0 else None,
                      "finish_reason": finish if i == last else None}
            out.append(OpenAIObject({"id": self.chat_id, "object": "chat.completion.chunk", "created": self.created,
                                     "model": self.model, "choices": [choice]}))
        return out


def usage_chunk(result: RequestOutput, *, model: str, chat_id: str, created: int) -> OpenAIObject:
    return OpenAIObject({"id": chat_id, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [], "usage": usage(len(result.prompt_token_ids), result.num_generated_tokens,
                                                       result.num_cached_tokens)})


def now() -> int:
    return int(time.time())


# ---- legacy text completions (/v1/completions) -------------------------------------------------
def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def completion_logprobs(entries: list | None, text_offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's legacy logprobs shape: parallel lists of tokens, their logprobs, top alternatives
    (token -> logprob) and character offsets into the choice's text."""
    if entries is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.token)
        token_logprobs.append(e.logprob)
        top.append({t.token: t.logprob for t in e.top_logprobs})
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict[str, Any] | None,
                      ) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion(choices: list[dict[str, Any]], *, model: str, completion_id: str, created: int,
                    usage_body: dict[str, Any]) -> OpenAIObject:
    return OpenAIObject({"id": completion_id, "object": "text_completion", "created": created, "model": model,
                         "choices": choices, "usage": usage_body})


def completion_chunk(choice: dict[str, Any] | None, *, model: str, completion_id: str, created: int,
                     usage_body: dict[str, Any] | None = None) -> OpenAIObject:
    """One streamed text_completion chunk (one choice), or the final usage-only chunk (choice None)."""
    body: dict[str, Any] = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                            "choices": [] if choice is None else [choice]}
    if usage_body is not None:
        body["usage"] = usage_body
    return OpenAIObject(body)


def timed_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int, *, prompt_time_s: float,
                completion_time_s: float) -> dict[str, Any]:
    """``usage`` with mistral.rs's timing fields (seconds, tokens per second) added.

    prompt time is the time to the first token; completion time runs from there to the last token."""
    body = usage(prompt_tokens, completion_tokens, cached_tokens)
    total = prompt_time_s + completion_time_s

    def rate(n: int, s: float) -> float:
        return n / s if s > 0 else 0.0

    body.update(total_time_sec=total, total_prompt_time_sec=prompt_time_s,
                total_completion_time_sec=completion_time_s,
                avg_tok_per_sec=rate(prompt_tokens + completion_tokens, total),
                avg_prompt_tok_per_sec=rate(prompt_tokens, prompt_time_s),
                avg_compl_tok_per_sec=rate(completion_tokens, completion_time_s))
    return body
