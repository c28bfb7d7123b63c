"""OpenAI request bodies (pydantic), with mistral.rs's extension fields.

Unknown fields are ignored (clients send vendor fields freely); type errors become 400s. Value
ranges are checked by SamplingParams, so the server and the Python API agree; the same ranges are
declared on the fields here, so /openapi.json states them (bounds that depend on the model are filled
in by server/openapi.py).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from mistralpy.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from mistralpy.server import openapi as doc
from mistralpy.server.openapi import bound

MAX_N = 128  # choices per request (OpenAI's limit): more would only queue up the engine


def _integral(value: Any) -> Any:
    # JSON Schema's "integer" includes 9.0; strict mode alone would refuse it.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]  # an integer field of a request body
# (constraints before the validator: after it pydantic would not write them into the JSON schema)
TokenId = Annotated[int, Field(ge=0, json_schema_extra=bound("vocab")), BeforeValidator(_integral)]
OutputLength = Annotated[int, Field(ge=1, json_schema_extra=bound("context")), BeforeValidator(_integral)]
# logit_bias keys: token ids written as decimal strings (JSON object keys)
TokenKey = Annotated[str, StringConstraints(pattern=r"^(0|[1-9][0-9]*)$"), Field(json_schema_extra=bound("vocab"))]
Bias = Annotated[float, Field(ge=-100, le=100)]
StopString = Annotated[str, StringConstraints(min_length=1)]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
Seed = Annotated[int, Field(ge=-2**63, le=2**64 - MAX_N), BeforeValidator(_integral)]  # torch: seed + i of choice i
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), BeforeValidator(_integral)]
Choices = Annotated[int, Field(ge=1, le=MAX_N), BeforeValidator(_integral)]
Positive = Annotated[int, Field(ge=1), BeforeValidator(_integral)]
NonNegative = Annotated[int, Field(ge=0), BeforeValidator(_integral)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class _Body(BaseModel):
    # strict: JSON types as the schema states them (no "1" for 1, no 0 for false), so a body the
    # document calls invalid is refused rather than coerced.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by chat and text completions. ``None`` means: the model's generation_config."""

    model: str | None = None
    n: Int = Field(1, ge=1, le=MAX_N)
    max_tokens: OutputLength | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[StopString] | None = None
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Annotated[dict[TokenKey, Bias] | None, doc.documented(doc.LOGIT_BIAS)] = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # mistral.rs / vLLM extensions
    top_k: Int | None = Field(None, description="0 or a negative value: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    dry_multiplier: float | None = Field(None, ge=0)
    dry_base: float | None = Field(None, gt=1)
    dry_allowed_length: Positive | None = None
    dry_sequence_breakers: list[str] | None = None
    ignore_eos: bool = False
    min_tokens: Int = Field(0, ge=0, json_schema_extra=bound("context"),
                            description="at most max_tokens when that is given")
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    truncate_sequence: bool = Field(False, description="keep the last tokens of a prompt that does not fit")
    # Structured output: OpenAI response_format, or mistral.rs grammar {"type": ..., "value": ...}.
    response_format: Annotated[dict[str, Any] | None, doc.documented(doc.RESPONSE_FORMAT)] = None
    grammar: Annotated[dict[str, Any] | None, doc.documented(doc.GRAMMAR)] = None

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
    content: Annotated[str | list[dict[str, Any]] | None, doc.documented(doc.CHAT_CONTENT)] = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: OutputLength | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: Annotated[list[dict[str, Any]] | None, doc.documented(doc.CHAT_TOOLS)] = None
    tool_choice: Annotated[str | dict[str, Any] | None, doc.documented(doc.CHAT_TOOL_CHOICE)] = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    enable_thinking: bool | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    # Server-side tools (server/tool_loop.py): rounds of tool calls run in the server (default:
    # --max-tool-rounds), and the search tools' result budget ({"search_context_size": low|medium|high}).
    max_tool_rounds: NonNegative | None = None
    web_search_options: dict[str, Any] | None = None

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self.sampling_params(logprobs=self.logprobs or bool(self.top_logprobs),
                                    top_logprobs=self.top_logprobs or 0, max_tokens=max_tokens)


class CompletionRequest(_SamplingFields):
    # one prompt, or a list of texts and/or token lists; none of them empty
    prompt: NonEmptyStr | TokenIds | Annotated[list[NonEmptyStr | TokenIds], Field(min_length=1)]
    echo: bool = False
    suffix: str | None = None
    best_of: Choices | None = Field(None, description="at least n")
    logprobs: TopLogprobs | None = Field(None,
                                 description="number of top alternatives per token (0 = the sampled one)")
    max_tokens: OutputLength | None = 16  # OpenAI's default for text completions


class TokenizeRequest(_Body):
    """Exactly one of ``prompt`` and ``messages`` (neither may be null)."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})
    model: str | None = None
    prompt: str = None  # type: ignore[assignment]  # absent: None; an explicit null is a 400
    messages: list[ChatMessage] = Field(None, min_length=1)  # type: ignore[assignment]
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, json_schema_extra=bound("tokenizer_vocab")), BeforeValidator(_integral)]]
    skip_special_tokens: bool = True


class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mistralpy"
    max_model_len: int | None = None
    mcp_tools_count: int = 0          # tools of the model's MCP servers (connected ones)
    mcp_servers_connected: int = 0


# ---- response bodies (documentation: the routes build these as dicts) ------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")  # mistral.rs's timing fields and the like ride along


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Out):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Out):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenizeResponse(_Out):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Out):
    text: str


class ModelInfo(ModelCard):
    model_config = ConfigDict(extra="allow")
    status: Literal["loaded", "unloaded"]
    default: bool


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelInfo]


class HealthResponse(_Out):
    status: Literal["ok", "error"]
    models: dict[str, Literal["loaded", "unloaded"]]
    model: str | None = None
    error: str | None = None
