"""Chat templates: Jinja2 in a sandbox, rendered the way Hugging Face transformers renders them.

Templates published with checkpoints are untrusted code written against transformers'
`apply_chat_template`, so the environment mirrors it: `ImmutableSandboxedEnvironment` with
`trim_blocks`/`lstrip_blocks`, the loop-controls extension, a `{% generation %}` block (rendered
as its body), an HF-style `tojson`, `raise_exception`, `strftime_now`, `dict` and a namespace that
refuses underscore attributes. Messages are normalised as transformers does (objects to dicts, keys
whose value is None dropped, reasoning aliased under `reasoning_content`/`thinking`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mistralpy.errors import ChatTemplateError

logger = logging.getLogger(__name__)

__all__ = ["ChatTemplate", "compile_template"]

# Names a message's reasoning is passed under; templates read the first (Qwen) or `thinking` (gpt-oss).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _RaisedByTemplate(jinja2.exceptions.TemplateError):
    """raise_exception() was called inside the template."""


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; we render the body."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _RaisedByTemplate(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Sequence[str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and takes no options; HF templates expect json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=tuple(separators) if separators is not None else None, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A jinja namespace that rejects underscore-prefixed names (no reach into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile (once per distinct source) a chat template. Raises ChatTemplateError on syntax errors."""
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from e


def _plain(value: Any) -> Any:
    """Rebuild inputs from plain JSON-like types so the sandbox never sees arbitrary objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (server protocol objects)
        return _plain(value.model_dump())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """Messages as plain dicts, keys whose value is None dropped, reasoning aliased (as transformers does)."""
    out = []
    for message in _plain(list(messages)):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be dicts, got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


class ChatTemplate:
    """A compiled chat template plus the special tokens it can refer to.

    `extra_context` holds further variables every render sees (e.g. `unk_token`, `pad_token`,
    Gemma's `boi_token`); keyword arguments of `render` override them.
    """

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 extra_context: dict | None = None) -> None:
        if not isinstance(source, str) or not source:
            raise ChatTemplateError("chat template must be a non-empty string")
        self.source = source
        self._template = compile_template(source)
        context: dict[str, Any] = {}
        for key, value in (extra_context or {}).items():
            if value is not None:
                context[key] = value
        if bos_token is not None:
            context["bos_token"] = bos_token
        if eos_token is not None:
            context["eos_token"] = eos_token
        self.context = context

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars)"

    def render(self, messages: Sequence[Any], *, add_generation_prompt: bool = True,
               tools: Sequence[Any] | None = None, documents: Sequence[Any] | None = None,
               continue_final_message: bool = False, **kwargs: Any) -> str:
        """Render `messages` (OpenAI-style dicts) to the prompt text.

        `tools` are passed through as given (OpenAI `{"type": "function", "function": {...}}` dicts,
        as transformers does with dict tools). `continue_final_message` leaves the last message open
        so that the model continues it (incompatible with `add_generation_prompt`). Other keyword
        arguments (e.g. `enable_thinking`) become template variables. Errors raise ChatTemplateError.
        """
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt are not compatible")
        chat = normalize_messages(messages)
        if tools is not None:
            tools = [self._tool_schema(t) for t in tools]
        if documents is not None:
            documents = _plain(list(documents))
            if not all(isinstance(d, dict) for d in documents):
                raise ChatTemplateError("documents must be a list of dicts with 'title' and 'text' keys")
        final_message = None
        if continue_final_message:
            chat, final_message = self._tag_final_message(chat)
        variables = {**self.context, **_plain(kwargs)}
        try:
            text = self._template.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except _RaisedByTemplate as e:
            raise ChatTemplateError(str(e)) from e
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        if final_message is not None:
            text = self._cut_at_tag(text, final_message)
        return text

    @staticmethod
    def _tool_schema(tool: Any) -> Any:
        tool = _plain(tool)
        if not isinstance(tool, dict):
            raise ChatTemplateError("tools must be JSON-schema dicts (OpenAI function tools)")
        return tool

    @staticmethod
    def _tag_final_message(chat: list[dict]) -> tuple[list[dict], str]:
        if not chat:
            raise ChatTemplateError("continue_final_message is set but the conversation is empty")
        last = chat[-1]
        content = last.get("content")
        if isinstance(content, str):
            last["content"] = content + _CONTINUE_TAG
            return chat, content
        if isinstance(content, list):
            for block in reversed(content):
                if isinstance(block, dict) and "text" in block:
                    text = block["text"]
                    block["text"] = text + _CONTINUE_TAG
                    return chat, text
        raise ChatTemplateError("continue_final_message is set but the final message has no text to continue")

    @staticmethod
    def _cut_at_tag(text: str, final_message: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final_message.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message is set but the template dropped the final message")
        loc = text.rindex(tag)
        if text[loc:loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            return text[:loc]
        return text[:loc].rstrip()  # the template trimmed trailing spaces of the message
