"""Anthropic Messages API <-> the engine's OpenAI-style chat: request bodies, the conversion of
Anthropic messages to internal chat messages, and the response message / streaming events built
from the same parsed output (ChatSpec / ChoiceStream) the OpenAI chat route uses.

Mapping (internal side = what ``LLMEngine.prepare_chat`` takes):
- ``system`` (string or text blocks) -> a leading ``system`` message.
- user ``text`` / ``image`` blocks -> a user message with text / ``image_url`` parts (base64
  sources become ``data:`` URLs, so every image goes through the guarded fetcher);
  ``tool_result`` blocks -> ``tool`` messages (``is_error`` prefixes the text with "Error: ").
- assistant ``text`` -> content, ``thinking`` -> ``reasoning_content``, ``tool_use`` -> ``tool_calls``;
  a final assistant turn of text is a prefill: the prompt ends with it and the answer continues it.
- ``tools`` -> function tools (``input_schema`` -> ``parameters``); ``tool_choice`` auto / any /
  tool / none -> "auto" / "required" / a named function / "none"; ``disable_parallel_tool_use`` ->
  ``parallel_tool_calls=False``; ``thinking`` enabled / disabled -> ``enable_thinking`` True / False
  (``budget_tokens`` is accepted but not enforced: thinking counts against ``max_tokens``);
  ``output_config.effort`` -> ``reasoning_effort`` (xhigh / max -> high); ``output_config.format``
  (json_schema) -> the structured-output path (``response_format``).
- ``temperature`` / ``top_p`` / ``top_k``: fields, as older clients send them (the SDK 2.x dropped
  them as arguments: ``extra_body``). ``metadata``: accepted, unused.
"""
from __future__ import annotations

import binascii
import json
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mistralpy.engine.chat_output import ChatSpec, ChoiceStream
from mistralpy.errors import InvalidRequestError
from mistralpy.sampling_params import SamplingParams
from mistralpy.server.errors import anthropic_error_body
from mistralpy.server import openapi as doc
from mistralpy.server.protocol import Int, OutputLength, Seed, StopString

IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})


# ---- request bodies ------------------------------------------------------------------------------
class _Body(BaseModel):
    # cache_control, service_tier, ...: accepted, unused; strict JSON types, as the schema states them
    model_config = ConfigDict(extra="ignore", strict=True)


def _message_schema(schema: dict[str, Any]) -> None:
    schema.clear()
    schema.update(doc.ANTHROPIC_MESSAGE)  # the blocks each role may hold (checked in _user_messages / ...)


class AnthropicMessage(_Body):
    model_config = ConfigDict(json_schema_extra=_message_schema)
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class CountTokensRequest(_Body):
    """``POST /v1/messages/count_tokens``: what shapes the prompt."""

    model: str | None = None  # None / "default": the default model
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: Annotated[str | list[dict[str, Any]] | None, doc.documented(doc.ANTHROPIC_SYSTEM)] = None
    tools: Annotated[list[dict[str, Any]] | None, doc.documented(doc.ANTHROPIC_TOOLS)] = None
    tool_choice: Annotated[dict[str, Any] | None, doc.documented(doc.ANTHROPIC_TOOL_CHOICE)] = None
    thinking: Annotated[dict[str, Any] | None, doc.documented(doc.ANTHROPIC_THINKING)] = None
    output_config: Annotated[dict[str, Any] | None, doc.documented(doc.ANTHROPIC_OUTPUT_CONFIG)] = None  # {"effort", "format": {"type": "json_schema", "schema"}}


class MessagesRequest(CountTokensRequest):
    """``POST /v1/messages``; the fields after ``metadata`` are mistral.py extensions."""

    max_tokens: OutputLength
    stop_sequences: list[StopString] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0)  # None: the model's generation_config
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: Int | None = None
    metadata: dict[str, Any] | None = None
    seed: Seed | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    ignore_eos: bool = False
    # {"type": "regex" | "lark" | "json_schema", "value": ...}
    grammar: Annotated[dict[str, Any] | None, doc.documented(doc.GRAMMAR)] = None

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, stop=list(self.stop_sequences or []),
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                              min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                              ignore_eos=self.ignore_eos, grammar=self.grammar,
                              response_format=_response_format(self.output_config))


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class MessageUsage(_Out):
    input_tokens: int
    output_tokens: int


class MessageResponse(_Out):
    """The ``message`` object :func:`message_body` builds (documentation of /v1/messages)."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]  # text / thinking / tool_use blocks
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: MessageUsage


class CountTokensResponse(_Out):
    input_tokens: int


def _response_format(output_config: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (output_config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InvalidRequestError("output_config.format must be {'type': 'json_schema', 'schema': {...}}",
                                  "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def _effort(output_config: dict[str, Any] | None) -> str | None:
    effort = (output_config or {}).get("effort")
    if effort is None:
        return None
    if effort not in ("low", "medium", "high", "xhigh", "max"):
        raise InvalidRequestError("output_config.effort must be 'low', 'medium', 'high', 'xhigh' or 'max'",
                                  "output_config.effort")
    return "high" if effort in ("xhigh", "max") else effort  # templates know low / medium / high


# ---- request conversion --------------------------------------------------------------------------
@dataclass(slots=True)
class ChatRequest:
    """An Anthropic request as the engine's chat arguments."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    enable_thinking: bool | None = None
    reasoning_effort: str | None = None
    prefill: str = ""  # a final assistant turn's text: appended to the rendered prompt

    def prepare_kwargs(self) -> dict[str, Any]:
        return {"tools": self.tools, "tool_choice": self.tool_choice, "enable_thinking": self.enable_thinking,
                    "reasoning_effort": self.reasoning_effort, "parallel_tool_calls": self.parallel_tool_calls}


def _fail(message: str, field: str) -> InvalidRequestError:
    return InvalidRequestError(message, field)


def _text_of(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _fail(f"{where}.text must be a string", where)
    return text


def _block_type(block: Any, where: str) -> str:
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        raise _fail(f"{where} must be a content block object with a string 'type'", where)
    return block["type"]


def _system_text(system: str | list[dict[str, Any]] | None) -> str | None:
    if system is None or isinstance(system, str):
        return system or None
    texts = []
    for j, block in enumerate(system):
        where = f"system.{j}"
        if _block_type(block, where) != "text":
            raise _fail(f"{where}: system blocks must be text blocks, not {block['type']!r}", where)
        texts.append(_text_of(block, where))
    return "\n".join(texts) or None


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    kind = source.get("type") if isinstance(source, dict) else None
    if kind == "base64":
        media_type, data = source.get("media_type"), source.get("data")
        if media_type not in IMAGE_MEDIA_TYPES:
            raise _fail(f"{where}.source.media_type must be one of {sorted(IMAGE_MEDIA_TYPES)}, not {media_type!r}",
                        where)
        if not isinstance(data, str) or not data:
            raise _fail(f"{where}.source.data must be a non-empty base64 string", where)
        try:  # checked here so the error names the Anthropic block (the fetcher would name our part)
            binascii.a2b_base64(data.encode("ascii", "strict"), strict_mode=True)
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise _fail(f"{where}.source.data is not valid base64", where) from None
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url:
            raise _fail(f"{where}.source.url must be a non-empty string", where)
    else:
        raise _fail(f"{where}.source must be {{'type': 'base64', 'media_type', 'data'}} or "
                    f"{{'type': 'url', 'url'}}", where)
    return {"type": "image_url", "image_url": {"url": url}}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _fail(f"{where}.tool_use_id must be a non-empty string", where)
    content = block.get("content", "")
    parts: list[dict[str, Any]] = []
    if isinstance(content, str):
        parts.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for k, inner in enumerate(content):
            here = f"{where}.content.{k}"
            kind = _block_type(inner, here)
            if kind == "text":
                parts.append({"type": "text", "text": _text_of(inner, here)})
            elif kind == "image":
                parts.append(_image_part(inner, here))
            else:
                raise _fail(f"{here}: a tool_result holds text and image blocks, not {kind!r}", here)
    else:
        raise _fail(f"{where}.content must be a string or a list of blocks", where)
    if block.get("is_error"):  # templates have no error flag: say it in the text the model reads
        if parts and parts[0]["type"] == "text":
            parts[0] = {"type": "text", "text": "Error: " + parts[0]["text"]}
        else:
            parts.insert(0, {"type": "text", "text": "Error:"})
    if all(p["type"] == "text" for p in parts):
        return {"role": "tool", "tool_call_id": call_id, "content": "\n".join(p["text"] for p in parts)}
    return {"role": "tool", "tool_call_id": call_id, "content": parts}


def _user_messages(content: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """One user turn -> tool messages (its tool_result blocks) and user messages, in block order."""
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        here = f"{where}.content.{j}"
        kind = _block_type(block, here)
        if kind == "text":
            parts.append({"type": "text", "text": _text_of(block, here)})
        elif kind == "image":
            parts.append(_image_part(block, here))
        elif kind == "tool_result":
            if parts:  # text before a result stays before it
                out.append({"role": "user", "content": parts})
                parts = []
            out.append(_tool_result(block, here))
        else:
            raise _fail(f"{here}: unsupported content block type {kind!r} in a user message "
                        "(text, image and tool_result are)", here)
    if parts or not out:
        out.append({"role": "user", "content": parts})
    return out


def _assistant_message(content: list[dict[str, Any]], where: str) -> dict[str, Any]:
    texts, thinking, calls = [], [], []
    for j, block in enumerate(content):
        here = f"{where}.content.{j}"
        kind = _block_type(block, here)
        if kind == "text":
            texts.append(_text_of(block, here))
        elif kind == "thinking":
            if not isinstance(block.get("thinking"), str):
                raise _fail(f"{here}.thinking must be a string", here)
            thinking.append(block["thinking"])
        elif kind == "redacted_thinking":
            pass  # opaque to anything but Anthropic's own models
        elif kind == "tool_use":
            call_id, name, args = block.get("id"), block.get("name"), block.get("input", {})
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise _fail(f"{here}: a tool_use block needs a string 'id' and 'name'", here)
            if not isinstance(args, dict):
                raise _fail(f"{here}.input must be an object", here)
            calls.append({"id": call_id, "type": "function",
                          "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})
        else:
            raise _fail(f"{here}: unsupported content block type {kind!r} in an assistant message "
                        "(text, thinking and tool_use are)", here)
    msg: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if thinking:
        msg["reasoning_content"] = "\n".join(thinking)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise _fail(f"{where}: server tools ({kind!r}) are not supported; give name, description and "
                        "input_schema", where)
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _fail(f"{where}.name must be a non-empty string", where)
        if not isinstance(schema, dict):
            raise _fail(f"{where}.input_schema must be a JSON schema object", where)
        fn: dict[str, Any] = {"name": name}  # OpenAI's key order: templates dump the dict as is
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = schema
        if tool.get("strict") is True:  # our strict tools: the arguments are constrained in auto mode too
            fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: dict[str, Any] | None) -> tuple[str | dict[str, Any] | None, bool]:
    """(OpenAI tool_choice, parallel tool calls allowed)."""
    if choice is None:
        return None, True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise _fail("tool_choice {'type': 'tool'} needs the tool's 'name'", "tool_choice")
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise _fail("tool_choice.type must be 'auto', 'any', 'tool' or 'none'", "tool_choice")


def _thinking(thinking: dict[str, Any] | None) -> bool | None:
    if thinking is None:
        return None
    kind = thinking.get("type")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, float) and budget.is_integer():  # JSON Schema's integers include 9.0
            budget = int(budget)
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise _fail("thinking.budget_tokens must be a positive integer", "thinking")
        return True
    if kind == "disabled":
        return False
    if kind == "adaptive":
        return None  # the model's own default
    raise _fail("thinking.type must be 'enabled', 'disabled' or 'adaptive'", "thinking")


def to_chat_request(body: CountTokensRequest) -> ChatRequest:
    """An Anthropic request's conversation and options as internal chat arguments (raises
    InvalidRequestError naming the Anthropic field at fault)."""
    if not body.messages:
        raise _fail("messages must hold at least one message", "messages")
    messages: list[dict[str, Any]] = []
    system = _system_text(body.system)
    if system is not None:
        messages.append({"role": "system", "content": system})
    prefill = ""
    last = len(body.messages) - 1
    for i, msg in enumerate(body.messages):
        where = f"messages.{i}"
        if msg.role == "user":
            messages += ([{"role": "user", "content": msg.content}] if isinstance(msg.content, str)
                         else _user_messages(msg.content, where))
            continue
        turn = (_assistant_message(msg.content, where) if isinstance(msg.content, list)
                else {"role": "assistant", "content": msg.content})
        if i == last and messages and not turn.get("tool_calls"):
            prefill = turn["content"]  # Anthropic's prefill: the answer continues this text
        else:
            messages.append(turn)
    tool_choice, parallel = _tool_choice(body.tool_choice)
    return ChatRequest(messages=messages, tools=_tools(body.tools), tool_choice=tool_choice,
                       parallel_tool_calls=parallel, enable_thinking=_thinking(body.thinking),
                       reasoning_effort=_effort(body.output_config), prefill=prefill)


# ---- responses ------------------------------------------------------------------------------------
def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def stop_reason(finish_reason: str | None, stopped_by: str | int | None, called: bool,
                stop_sequences: list[str]) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished output."""
    if finish_reason == "length":
        return "max_tokens", None
    if called:
        return "tool_use", None
    if isinstance(stopped_by, str) and stopped_by in stop_sequences:
        return "stop_sequence", stopped_by
    return "end_turn", None  # EOS (or a stop token)


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def content_blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An OpenAI-style assistant message (ChatSpec.message) as Anthropic content blocks."""
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    if message.get("content"):
        blocks.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        blocks.append({"type": "tool_use", "id": call["id"], "name": fn["name"], "input": _tool_input(fn["arguments"])})
    return blocks


def message_body(*, msg_id: str, model: str, content: list[dict[str, Any]], stop: str | None,
                 stop_sequence: str | None, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": stop_sequence,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}}


def sse(event: dict[str, Any]) -> str:
    """A named server-sent event, as Anthropic sends them (the name repeats the data's type)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def error_sse(status: int, message: str) -> str:
    return sse(anthropic_error_body(status, message))


class MessageEvents:
    """One streamed message: the engine's token deltas -> Anthropic's events, from the same parsed
    pieces (content / reasoning_content / tool_calls deltas) the OpenAI chunker streams. A block is
    opened by its first non-empty piece and closed when a piece of another kind (or another tool
    call) arrives, or at the end."""

    def __init__(self, spec: ChatSpec, *, msg_id: str, model: str, stop_sequences: list[str]) -> None:
        self.msg_id, self.model, self.stop_sequences = msg_id, model, stop_sequences
        self._stream: ChoiceStream | None = None if spec.plain else spec.stream()
        self._open: str | None = None  # kind of the open block: "text" | "thinking" | "tool_use"
        self._index = -1  # the open (or last) block's index
        self._call: int | None = None  # the parser's index of the call the open tool_use block holds

    def start(self, input_tokens: int) -> list[str]:
        message = message_body(msg_id=self.msg_id, model=self.model, content=[], stop=None, stop_sequence=None,
                               input_tokens=input_tokens, output_tokens=0)
        return [sse({"type": "message_start", "message": message}), sse({"type": "ping"})]

    def feed(self, text: str, final: bool) -> list[str]:
        if self._stream is None:
            pieces = [{"content": text}] if text else []
        else:
            pieces = self._stream.feed(text)
            if final:
                pieces += self._stream.finish()
        out: list[str] = []
        for piece in pieces:
            if piece.get("reasoning_content"):
                out += self._delta("thinking", {"type": "thinking_delta", "thinking": piece["reasoning_content"]})
            if piece.get("content"):
                out += self._delta("text", {"type": "text_delta", "text": piece["content"]})
            for call in piece.get("tool_calls") or []:
                out += self._call_piece(call)
        return out

    def finish(self, finish_reason: str | None, stopped_by: str | int | None, output_tokens: int) -> list[str]:
        out = self._close()
        called = self._stream is not None and self._stream.called
        stop, sequence = stop_reason(finish_reason, stopped_by, called, self.stop_sequences)
        out.append(sse({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": sequence},
                        "usage": {"output_tokens": output_tokens}}))
        out.append(sse({"type": "message_stop"}))
        return out

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        self._open, self._call = None, None
        return [sse({"type": "content_block_stop", "index": self._index})]

    def _begin(self, kind: str, block: dict[str, Any]) -> list[str]:
        out = self._close()
        self._open, self._index = kind, self._index + 1
        out.append(sse({"type": "content_block_start", "index": self._index, "content_block": block}))
        return out

    def _delta(self, kind: str, delta: dict[str, Any]) -> list[str]:
        out: list[str] = []
        if self._open != kind:
            empty = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "",
                                                                           "signature": ""}
            out = self._begin(kind, empty)
        out.append(sse({"type": "content_block_delta", "index": self._index, "delta": delta}))
        return out

    def _call_piece(self, call: dict[str, Any]) -> list[str]:
        out: list[str] = []
        fn = call.get("function") or {}
        if "id" in call:  # a new call: its name comes first, the arguments follow in pieces
            out = self._begin("tool_use", {"type": "tool_use", "id": call["id"], "name": fn.get("name", ""),
                                           "input": {}})
            self._call = call.get("index")
        elif self._open != "tool_use" or call.get("index") != self._call:
            return []  # arguments of a call whose block is not open: cannot happen with one stream
        if fn.get("arguments"):
            out.append(sse({"type": "content_block_delta", "index": self._index,
                            "delta": {"type": "input_json_delta", "partial_json": fn["arguments"]}}))
        return out
