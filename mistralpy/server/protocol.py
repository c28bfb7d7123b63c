"""OpenAI request bodies (pydantic), with mistral.rs's extension fields.

Unknown fields are ignored (clients send vendor fields freely); type errors become 400s. Value
ranges are checked once, by SamplingParams, so the server and the Python API agree.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mistralpy.sampling_params import SamplingParams


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by chat and text completions. ``None`` means: the model's generation_config."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # mistral.rs / vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_sequence_breakers: list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    truncate_sequence: bool = Field(False, description="keep the last tokens of a prompt that does not fit")
    # Structured output: OpenAI response_format, or mistral.rs grammar {"type": ..., "value": ...}.
    response_format: dict[str, Any] | None = None
    grammar: dict[str, Any] | None = None

    def sampling_params(self, *, logprobs: bool, top_logprobs: int, max_tokens: int | None,
                        n: int | None = None) -> SamplingParams:
        """SamplingParams for this request (raises InvalidRequestError naming a bad field)."""
        values: dict[str, Any] = {
            "n": self.n if n is None else n, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
            "min_p": self.min_p, "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "logit_bias": self.logit_bias, "logprobs": logprobs,
            "top_logprobs": top_logprobs, "seed": self.seed, "stop": self.stop or [], "max_tokens": max_tokens,
            "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos, "stop_token_ids": self.stop_token_ids or [],
            "skip_special_tokens": self.skip_special_tokens, "response_format": self.response_format,
            "grammar": self.grammar}
        for name in ("dry_multiplier", "dry_base", "dry_allowed_length", "dry_sequence_breakers"):
            if getattr(self, name) is not None:
                values[name] = getattr(self, name)
        return SamplingParams(**values)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... pass through to the template

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(logprobs=self.logprobs or bool(self.top_logprobs),
                                    top_logprobs=self.top_logprobs or 0, max_tokens=max_tokens)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str | list[int]]  # one prompt, or a list of texts and/or token lists
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, description="number of top alternatives per token (0 = the sampled one)")
    max_tokens: int | None = 16  # OpenAI's default for text completions


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
    skip_special_tokens: bool = True


class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mistralpy"
    max_model_len: int | None = None
