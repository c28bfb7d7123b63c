"""Results handed to users: RequestOutput / CompletionOutput (vLLM-like) and OpenAI-shaped objects."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(slots=True)
class LogprobEntry:
    """Logprob of one generated token plus the requested alternatives (best first)."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = field(default_factory=list)

    def to_openai(self) -> dict[str, Any]:
        return {
            "token": self.token, "logprob": self.logprob, "bytes": list(self.token.encode("utf-8")),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8"))}
                             for t in self.top_logprobs],
        }


@dataclass(slots=True)
class CompletionOutput:
    """One of the n choices. In a streamed output, text/token_ids/logprobs hold only the delta."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0   # prompt tokens served by the prefix cache
    error: str | None = None

    @property
    def num_generated_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


class OpenAIObject(dict):
    """A dict with attribute access, so OpenAI-shaped results read as `resp.choices[0].message.content`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return _wrap(self[name])
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: str) -> Any:
        return _wrap(dict.__getitem__(self, key))

    def model_dump(self) -> dict[str, Any]:
        return _unwrap(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, dict) and not isinstance(value, OpenAIObject):
        return OpenAIObject(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in dict.items(value)}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value
