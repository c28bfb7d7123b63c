"""What ``/openapi.json`` says, kept true to what the server answers.

* :func:`error_responses` documents a route's error statuses with the real bodies (OpenAI's
  ``{"error": {...}}``, or Anthropic's ``{"type": "error", "error": {...}}`` on ``/v1/messages*``);
  every route decorator uses it. 413 (body size limit) and 500 are on every route.
* :func:`install_openapi` post-processes FastAPI's document per request: FastAPI's 422 goes (the
  server answers validation errors with 400), the API key's security schemes and 401 are added when
  one is set, and the bounds that depend on the served model (context length, vocabulary size) are
  filled in from the default model, so a fuzzer's schema-valid body is one the server takes.
"""
from __future__ import annotations

import copy
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from mistralpy.server.errors import is_anthropic_path

# ---- error bodies -----------------------------------------------------------------------------------


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIError(BaseModel):
    """OpenAI's error body. A 500 after a partial generation also carries ``partial`` (chat and
    completions) or ``response`` (Responses)."""

    model_config = ConfigDict(extra="allow")
    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorDetail


_WHY = {
    400: "Invalid request: malformed JSON, a schema violation, or a value the model cannot take (a prompt "
         "longer than the context, token ids outside the vocabulary, an unsupported content part, ...).",
    401: "Missing or wrong API key (send `Authorization: Bearer KEY` or `x-api-key: KEY`).",
    404: "Unknown model (or stored response).",
    413: "Request body larger than the server's limit.",
    500: "Engine failure (with the partial output when there is one).",
    503: "The model is unloaded (POST /v1/models/{id}/reload), or the engine is down.",
}

# Every route can answer these: the body size limit runs before routing; any unexpected failure is a 500.
ALWAYS = (413, 500)


def error_responses(*statuses: int, anthropic: bool = False) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route decorator: ``statuses`` plus :data:`ALWAYS`, with their bodies."""
    model = AnthropicError if anthropic else OpenAIError
    return {status: {"model": model, "description": _WHY[status]} for status in sorted({*statuses, *ALWAYS})}


def sse_event(named: bool) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1: an event stream's ``schema`` describes each event);
    ``named``: every event has an ``event:`` line (Anthropic's and Responses' streams)."""
    return {"type": "object", "required": ["event", "data"] if named else ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"type": "string", "description": "a JSON object (OpenAI's streams end with `[DONE]`)"}}}


def json_or_sse(model: type[BaseModel] | None, *statuses: int, anthropic: bool = False,
                events: str = "server-sent events", named: bool = False) -> dict[int | str, dict[str, Any]]:
    """A generation route: JSON (``model``) or, with ``stream: true``, ``text/event-stream``."""
    ok: dict[str, Any] = {"description": f"The result as JSON, or with `stream: true` {events}.",
                          "content": {"text/event-stream": {"schema": sse_event(named)}}}
    if model is not None:
        ok["model"] = model
    return {200: ok, **error_responses(*statuses, anthropic=anthropic)}


def bound(kind: Literal["context", "vocab", "tokenizer_vocab"]) -> dict[str, Any]:
    """``json_schema_extra`` marking a bound that :func:`install_openapi` fills from the default model:
    ``context``: an output length (< the context length); ``vocab``: a token id of the model;
    ``tokenizer_vocab``: a token id the tokenizer can decode. On an integer: ``maximum``; on a
    string (a token id as an object key): ``pattern``."""
    return {"x-bound": kind}


# ---- the document -------------------------------------------------------------------------------


def below_regex(n: int) -> str:
    """A regex of the decimal integers 0 .. n-1 (no sign, no leading zeros); n >= 1."""
    top = str(n - 1)
    alts = ["0"] if len(top) > 1 else []
    if len(top) > 2:
        alts.append(f"[1-9][0-9]{{0,{len(top) - 2}}}")
    elif len(top) == 2:
        alts.append("[1-9]")
    for i, digit in enumerate(top):  # same length as top: a smaller digit at position i, then anything
        low = 1 if i == 0 and len(top) > 1 else 0
        if int(digit) > low:
            hi = int(digit) - 1
            rng = str(low) if hi == low else f"[{low}-{hi}]"
            alts.append(top[:i] + rng + (f"[0-9]{{{len(top) - i - 1}}}" if i < len(top) - 1 else ""))
    alts.append(top)
    return "^(" + "|".join(alts) + ")$"


def _limits(app: FastAPI) -> dict[str, int] | None:
    """The default model's bounds, or None when it is unloaded (every request is a 503 then)."""
    engine = app.state.server.registry.default.engine
    if engine is None:
        return None
    return {"context": engine.max_total_tokens - 1,  # a prompt has at least one token
            "vocab": engine.engine.inputs.vocab_size - 1,
            "tokenizer_vocab": len(engine.tokenizer.token_texts()) - 1,
            "media": int(engine.engine.media is not None)}


def _fill_bounds(node: Any, limits: dict[str, int] | None) -> Any:
    """``node`` with its x-bound markers filled in and, for a text-only model, its media parts gone."""
    if isinstance(node, dict):
        kind = node.pop("x-bound", None)
        if kind is not None and limits is not None:
            if node.get("type") == "string":
                node["pattern"] = below_regex(limits[kind] + 1)
            else:
                node["maximum"] = limits[kind]
        node.pop("x-media", None)
        for key, value in node.items():
            node[key] = _fill_bounds(value, limits)
    elif isinstance(node, list):
        text_only = limits is not None and not limits["media"]
        return [_fill_bounds(v, limits) for v in node if not (text_only and isinstance(v, dict) and v.get("x-media"))]
    return node


def _security(doc: dict[str, Any], public: frozenset[str]) -> None:
    doc.setdefault("components", {})["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
    for path, item in doc.get("paths", {}).items():
        if path in public:
            continue
        model = AnthropicError if is_anthropic_path(path) else OpenAIError
        for op in item.values():
            op["security"] = [{"bearer": []}, {"apiKey": []}]
            op["responses"]["401"] = {"description": _WHY[401], "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}


def install_openapi(app: FastAPI, *, api_key: bool, public: frozenset[str]) -> None:
    """Replace ``app.openapi`` with the post-processed document (see the module docstring)."""
    base: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not base:
            base.update(get_openapi(title=app.title, version=app.version, description=app.description,
                                    routes=app.routes))
            for item in base.get("paths", {}).values():
                for op in item.values():
                    op.get("responses", {}).pop("422", None)  # validation errors are answered as 400
            schemas = base.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for model in (OpenAIError, AnthropicError):  # 401 refers to them even where no route does
                schemas.setdefault(model.__name__, model.model_json_schema(ref_template="#/components/schemas/{model}"))
                for name, sub in model.model_json_schema(ref_template="#/components/schemas/{model}").get(
                        "$defs", {}).items():
                    schemas.setdefault(name, sub)
                schemas[model.__name__].pop("$defs", None)
        doc = copy.deepcopy(base)
        doc = _fill_bounds(doc, _limits(app))  # per request: a reload may bring another model
        if api_key:
            _security(doc, public)
        return doc

    app.openapi = openapi  # type: ignore[method-assign]


# ---- documented shapes of fields the route code validates itself --------------------------------
# These fields stay `dict[str, Any]` / `list[Any]` in the pydantic models (their checks live in the
# engine and format modules, with field paths in the errors); the annotations below only state in
# the document what those checks accept. Media parts carry "x-media": dropped from the document
# while the default model takes no images or videos (it refuses them).


def documented(schema: dict[str, Any]) -> Any:
    """A pydantic annotation replacing a field's generated JSON schema (validation unchanged)."""
    from pydantic import WithJsonSchema

    return WithJsonSchema(schema)


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props}


def _const(value: str) -> dict[str, Any]:
    return {"type": "string", "enum": [value]}


NULL = {"type": "null"}
NONEMPTY = {"type": "string", "minLength": 1, "pattern": r"\S"}
_URL_OR_OBJECT = {"anyOf": [NONEMPTY, _obj(["url"], url=NONEMPTY)]}

# OpenAI chat content parts (engine/media_input.py): text, and the media spellings it knows.
CHAT_PARTS = [_obj(["type", "text"], type=_const("text"), text={"type": "string"})] + [
    {**_obj(["type", key], type=_const(kind), **{key: _URL_OR_OBJECT}), "x-media": True}
    for kind, key in (("image_url", "image_url"), ("input_image", "image_url"), ("image", "image"),
                      ("video_url", "video_url"), ("video", "video"))]
CHAT_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": CHAT_PARTS}}, NULL]}

# OpenAI chat tools / tool_choice (engine/chat_output.py). A named tool_choice must name one of the tools.
_FUNCTION = _obj(["name"], name={"type": "string", "minLength": 1}, description={"type": "string"},
                 parameters={"anyOf": [{"type": "object"}, NULL]}, strict={"type": "boolean"})
CHAT_TOOLS = {"anyOf": [{"type": "array", "items": _obj(["function"], type=_const("function"), function=_FUNCTION)},
                        NULL]}
CHAT_TOOL_CHOICE = {"anyOf": [{"type": "string", "enum": ["none", "auto", "required"]},
                              _obj(["type", "function"], type=_const("function"),
                                   function=_obj(["name"], name={"type": "string"})), NULL],
                    "description": "'required' or a named function needs tools (and neither response_format "
                                   "nor grammar)"}

# Structured output (mistralpy/structured): the schema, regex or grammar must also compile.
RESPONSE_FORMAT = {"anyOf": [
    _obj(["type"], type={"type": "string", "enum": ["text", "json_object"]}),
    _obj(["type", "json_schema"], type=_const("json_schema"),
         json_schema={"type": "object", "properties": {"name": {"type": "string"},
                                                       "schema": {"type": ["object", "boolean"]}}}),
    NULL], "description": "not together with grammar"}
GRAMMAR = {"anyOf": [_obj(["type", "value"], type={"type": "string", "enum": ["regex", "lark"]}, value={"type": "string"}),
                     _obj(["type", "value"], type={"type": "string", "enum": ["json_schema", "llguidance"]},
                          value={"type": ["string", "object", "boolean"]}), NULL]}

# token id (a decimal string key) -> bias; pydantic would write patternProperties, which leave other keys free
LOGIT_BIAS = {"anyOf": [{"type": "object",
                         "propertyNames": {"type": "string", "pattern": "^(0|[1-9][0-9]*)$", **bound("vocab")},
                         "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}, NULL]}

# Anthropic Messages (server/anthropic_format.py)
_A_TEXT = _obj(["type", "text"], type=_const("text"), text={"type": "string"})
_A_IMAGE = {**_obj(["type", "source"], type=_const("image"), source={"oneOf": [
    _obj(["type", "media_type", "data"], type=_const("base64"),
         media_type={"type": "string", "enum": ["image/gif", "image/jpeg", "image/png", "image/webp"]},
         data={"type": "string", "minLength": 1, "contentEncoding": "base64"}),
    _obj(["type", "url"], type=_const("url"), url={"type": "string", "minLength": 1})]}), "x-media": True}
_A_TOOL_RESULT = _obj(["type", "tool_use_id"], type=_const("tool_result"),
                      tool_use_id={"type": "string", "minLength": 1},
                      content={"anyOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [_A_TEXT, _A_IMAGE]}}]})
_A_THINKING = _obj(["type", "thinking"], type=_const("thinking"), thinking={"type": "string"})
_A_REDACTED = _obj(["type"], type=_const("redacted_thinking"))
_A_TOOL_USE = _obj(["type", "id", "name"], type=_const("tool_use"), id={"type": "string", "minLength": 1},
                   name={"type": "string", "minLength": 1}, input={"type": "object"})


def _a_turn(role: str, blocks: list[dict[str, Any]]) -> dict[str, Any]:
    return _obj(["role", "content"], role=_const(role),
                content={"anyOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": blocks}}]})


ANTHROPIC_MESSAGE = {"oneOf": [_a_turn("user", [_A_TEXT, _A_IMAGE, _A_TOOL_RESULT]),
                               _a_turn("assistant", [_A_TEXT, _A_THINKING, _A_REDACTED, _A_TOOL_USE])]}
ANTHROPIC_SYSTEM = {"anyOf": [{"type": "string"}, {"type": "array", "items": _A_TEXT}, NULL]}
ANTHROPIC_TOOLS = {"anyOf": [{"type": "array", "items": _obj(
    ["name", "input_schema"], type={"anyOf": [_const("custom"), NULL]}, name={"type": "string", "minLength": 1},
    input_schema={"type": "object"}, description={}, strict={})}, NULL]}
ANTHROPIC_TOOL_CHOICE = {"anyOf": [
    _obj(["type"], type={"type": "string", "enum": ["auto", "any", "none"]}, disable_parallel_tool_use={}),
    _obj(["type", "name"], type=_const("tool"), name={"type": "string"}, disable_parallel_tool_use={}), NULL],
    "description": "'any' or a named tool needs tools"}
ANTHROPIC_THINKING = {"anyOf": [
    _obj(["type", "budget_tokens"], type=_const("enabled"), budget_tokens={"type": "integer", "minimum": 1}),
    _obj(["type"], type={"type": "string", "enum": ["disabled", "adaptive"]}), NULL]}
ANTHROPIC_OUTPUT_CONFIG = {"anyOf": [{"type": "object", "properties": {
    "effort": {"anyOf": [{"type": "string", "enum": ["low", "medium", "high", "xhigh", "max"]}, NULL]},
    "format": {"anyOf": [_obj(["type", "schema"], type=_const("json_schema"), schema={"type": "object"}), NULL]}}},
    NULL], "description": "format.schema must compile"}

# OpenAI Responses (server/responses_format.py)
_R_TEXT_PARTS = [_obj(["type", "text"], type={"type": "string", "enum": [
    "input_text", "output_text", "summary_text", "reasoning_text"]}, text={"type": "string"}),
    _obj(["type", "refusal"], type=_const("refusal"), refusal={"type": "string"})]
_R_PARTS = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"oneOf": [*_R_TEXT_PARTS, {
    **_obj(["type", "image_url"], type=_const("input_image"), image_url=NONEMPTY, file_id=NULL,
           detail={"anyOf": [{"type": "string"}, NULL]}), "x-media": True}]}}]}
_R_ITEMS = [
    _obj(["role", "content"], type=_const("message"), role={"type": "string", "enum": [
        "user", "system", "developer", "assistant"]}, content=_R_PARTS),
    _obj(["type", "call_id", "name", "arguments"], type=_const("function_call"), call_id={"type": "string"},
         name={"type": "string"}, arguments={"type": "string"}),
    _obj(["type", "call_id", "output"], type=_const("function_call_output"), call_id={"type": "string"},
         output={"anyOf": [{"type": "string"}, {"type": "array", "items": _obj(["text"], text={"type": "string"})}]}),
    _obj(["type"], type=_const("reasoning"), summary={"anyOf": [_R_PARTS, NULL]}, content={"anyOf": [_R_PARTS, NULL]}),
]
RESPONSES_INPUT = {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"oneOf": _R_ITEMS}}],
                   "description": "a function_call_output's call_id, a named tool_choice: as the chat forms"}
RESPONSES_TOOLS = {"anyOf": [{"type": "array", "items": {"oneOf": [
    _obj(["type", "name"], type=_const("function"), name={"type": "string", "minLength": 1},
         parameters={"anyOf": [{"type": "object"}, NULL]}, description={}, strict={}),
    _obj(["type", "function"], type=_const("function"), function=_FUNCTION)]}}, NULL]}
RESPONSES_TOOL_CHOICE = {"anyOf": [
    {"type": "string", "enum": ["none", "auto", "required"]},
    _obj(["type", "name"], type=_const("function"), name={"type": "string"}),
    _obj(["type", "tools"], type=_const("allowed_tools"), mode={"type": "string", "enum": ["none", "auto", "required"]},
         tools={"type": "array", "items": _obj(["name"], name={"type": "string"})}), NULL],
    "description": "'required', a named function or allowed_tools need tools naming them"}
RESPONSES_TEXT = {"anyOf": [{"type": "object", "properties": {"format": {"anyOf": [
    _obj(["type"], type={"type": "string", "enum": ["text", "json_object"]}),
    _obj(["type", "name", "schema"], type=_const("json_schema"), name={"type": "string"}, schema={"type": "object"}),
    NULL]}}}, NULL], "description": "format.schema must compile"}
RESPONSES_REASONING = {"anyOf": [{"type": "object", "properties": {"effort": {"anyOf": [{"type": "string", "enum": [
    "none", "minimal", "low", "medium", "high", "xhigh"]}, NULL]}}}, NULL]}
# OpenAI's limits: 16 pairs, keys up to 64 and values up to 512 characters (checked by the route)
RESPONSES_METADATA = {"anyOf": [{"type": "object", "maxProperties": 16, "propertyNames": {"maxLength": 64},
                                 "additionalProperties": {"type": "string", "maxLength": 512}}, NULL]}
