"""The OpenAI Responses API over our chat machinery: Responses input items -> chat messages, flat
function tools / tool_choice / text.format -> the chat forms, and :class:`OutputBuilder`, which
turns the parsed chat deltas of a :class:`ChoiceStream` (``content`` / ``reasoning_content`` /
``tool_calls`` dicts, the same ones the chat route streams) into output items and Responses'
named stream events. The non-streamed route runs the same builder over the whole text, so a
streamed response ends equal to the non-streamed one.
"""
from __future__ import annotations

import copy
import time
import uuid
from typing import Any

from mistralpy.engine.chat_output import ChatSpec
from mistralpy.errors import InvalidRequestError

TERMINAL = ("completed", "incomplete", "failed", "cancelled")
_EVENT_OF_STATUS = {"completed": "response.completed", "incomplete": "response.incomplete",
                    "failed": "response.failed"}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _bad(message: str, param: str = "input") -> InvalidRequestError:
    return InvalidRequestError(message, param)


# ---- input items -------------------------------------------------------------------------------
def _text_parts(content: Any, where: str, kind: str) -> list[dict[str, Any]]:
    """A message's content as canonical Responses parts (``kind``: input_text or output_text)."""
    if isinstance(content, str):
        content = [{"type": kind, "text": content}]
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or a list of content parts")
    parts = []
    for j, part in enumerate(content):
        ptype = part.get("type") if isinstance(part, dict) else None
        if ptype in ("input_text", "output_text", "refusal", "summary_text", "reasoning_text"):
            text = part.get("refusal") if ptype == "refusal" else part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.content[{j}] needs a string 'text'")
            out = {"type": ptype, "text": text} if ptype != "refusal" else {"type": "refusal", "refusal": text}
            if ptype == "output_text":
                out["annotations"] = list(part.get("annotations") or [])
            parts.append(out)
        elif ptype == "input_image":
            url = part.get("image_url")
            if part.get("file_id") is not None:
                raise _bad(f"{where}.content[{j}]: file_id images are not supported; send image_url "
                           "(a URL or a data: URL)")
            if not isinstance(url, str) or not url:
                raise _bad(f"{where}.content[{j}] needs an 'image_url' string")
            parts.append({"type": "input_image", "image_url": url, "detail": part.get("detail") or "auto"})
        else:
            raise _bad(f"{where}.content[{j}]: content part type {ptype!r} is not supported")
    return parts


def _str_output(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):  # input_text parts (images in a tool output are not supported)
        texts = [p.get("text") for p in output if isinstance(p, dict)]
        if all(isinstance(t, str) for t in texts) and len(texts) == len(output):
            return "\n".join(texts)
    raise _bad(f"{where}.output must be a string or a list of input_text parts")


def normalize_input(value: str | list[Any]) -> list[dict[str, Any]]:
    """The request's ``input`` as canonical items, each with an id (what is stored and listed)."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not value:
        raise _bad("input must be a non-empty string or list of items")
    items = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object")
        itype = item.get("type") or ("message" if "role" in item else None)
        if itype == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role must be 'user', 'system', 'developer' or 'assistant'")
            kind = "output_text" if role == "assistant" else "input_text"
            items.append({"id": item.get("id") or new_id("msg"), "type": "message", "role": role,
                          "content": _text_parts(item.get("content"), where, kind),
                          "status": item.get("status") or "completed"})
        elif itype == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise _bad(f"{where}: a function_call needs string '{key}'")
            items.append({"id": item.get("id") or new_id("fc"), "type": "function_call", "call_id": item["call_id"],
                          "name": item["name"], "arguments": item["arguments"],
                          "status": item.get("status") or "completed"})
        elif itype == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{where}: a function_call_output needs a string 'call_id'")
            items.append({"id": item.get("id") or new_id("fco"), "type": "function_call_output",
                          "call_id": item["call_id"], "output": _str_output(item.get("output"), where),
                          "status": item.get("status") or "completed"})
        elif itype == "reasoning":
            items.append({"id": item.get("id") or new_id("rs"), "type": "reasoning",
                          "summary": _text_parts(item.get("summary") or [], where, "summary_text"),
                          "content": _text_parts(item.get("content") or [], where, "reasoning_text"),
                          "status": item.get("status") or "completed"})
        else:
            raise _bad(f"{where}: item type {itype!r} is not supported (message, function_call, "
                       "function_call_output, reasoning)")
    return items


def to_messages(items: list[dict[str, Any]], instructions: str | None) -> list[dict[str, Any]]:
    """Canonical items -> our chat messages. Consecutive assistant output (a message, function
    calls) becomes one assistant turn; a reasoning item becomes that turn's ``reasoning_content``."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    names: dict[str, str] = {}  # call_id -> function name, for the tool message
    turn: dict[str, Any] | None = None  # the assistant turn being gathered

    def assistant() -> dict[str, Any]:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    for item in items:
        itype = item["type"]
        if itype == "message" and item["role"] == "assistant":
            text = "".join(p.get("text") or p.get("refusal") or "" for p in item["content"])
            assistant()["content"] += text
        elif itype == "reasoning":
            # (a refusal part holds "refusal", not "text")
            text = "\n".join(p.get("text") or p.get("refusal") or "" for p in item["content"] or item["summary"])
            msg = assistant()
            msg["reasoning_content"] = (msg.get("reasoning_content", "") + "\n" + text).lstrip("\n")
        elif itype == "function_call":
            names[item["call_id"]] = item["name"]
            assistant().setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
        elif itype == "function_call_output":
            turn = None
            msg = {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            if item["call_id"] in names:
                msg["name"] = names[item["call_id"]]
            messages.append(msg)
        else:  # a user / system / developer message
            turn = None
            role = "system" if item["role"] == "developer" else item["role"]  # templates know no developer
            parts = item["content"]
            if any(p["type"] == "input_image" for p in parts):
                content: Any = [{"type": "image_url", "image_url": {"url": p["image_url"]}}
                                if p["type"] == "input_image" else {"type": "text", "text": p["text"]} for p in parts]
            else:
                content = "\n".join(p.get("text") or p.get("refusal") or "" for p in parts)
            messages.append({"role": role, "content": content})
    return messages


def output_to_items(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored response's output items, as input items of the next turn."""
    return [copy.deepcopy(o) for o in output if o.get("type") in ("message", "function_call", "reasoning")]


# ---- tools, tool_choice, text.format -----------------------------------------------------------
def chat_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Flat Responses function tools -> chat tools ({"type": "function", "function": {...}})."""
    if not tools:
        return None
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise _bad(f"tools[{i}]: only function tools are supported (got {kind!r})", "tools")
        if isinstance(tool.get("function"), dict):  # the chat form, accepted as well
            out.append(tool)
            continue
        # in the client's key order: the template prints the tool as JSON, as the chat route would
        fn = {k: v for k, v in tool.items() if k in ("name", "description", "parameters", "strict") and v is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any, tools: list[dict[str, Any]] | None) -> tuple[Any, list[dict[str, Any]] | None]:
    """(chat tool_choice, tools): a named function or ``allowed_tools`` (which narrows the tools)."""
    if choice is None or isinstance(choice, str):
        return choice, tools
    if isinstance(choice, dict) and choice.get("type") == "function":
        if isinstance(choice.get("function"), dict):  # chat form
            return choice, tools
        return {"type": "function", "function": {"name": choice.get("name")}}, tools
    if isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        allowed = {t["name"] for t in choice.get("tools") or []
                   if isinstance(t, dict) and isinstance(t.get("name"), str)}  # (a dict name is unhashable)
        kept = [t for t in tools or [] if (t.get("function") or {}).get("name") in allowed]
        if not kept:
            raise _bad("tool_choice.allowed_tools names none of the tools", "tool_choice")
        return choice.get("mode", "auto"), kept
    raise _bad("tool_choice must be 'none', 'auto', 'required', {'type': 'function', 'name': ...} or "
               "{'type': 'allowed_tools', ...}", "tool_choice")


def text_format(text: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(chat response_format or None, the ``text.format`` echoed in the response)."""
    fmt = (text or {}).get("format") or {"type": "text"}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None, {"type": "text"}
    if kind == "json_object":
        return {"type": "json_object"}, {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict) or not isinstance(fmt.get("name"), str):
            raise _bad("text.format json_schema needs a 'name' and a 'schema' object", "text.format")
        inner = {k: fmt[k] for k in ("name", "schema", "strict", "description") if fmt.get(k) is not None}
        return {"type": "json_schema", "json_schema": inner}, {"type": "json_schema", **inner}
    raise _bad("text.format.type must be 'text', 'json_object' or 'json_schema'", "text.format")


def reasoning_options(reasoning: dict[str, Any] | None) -> tuple[str | None, bool | None]:
    """(reasoning_effort for the template, enable_thinking): effort "none" turns thinking off."""
    effort = (reasoning or {}).get("effort")
    if effort is None:
        return None, None
    if effort not in ("none", "minimal", "low", "medium", "high", "xhigh"):
        raise _bad("reasoning.effort must be 'none', 'minimal', 'low', 'medium', 'high' or 'xhigh'",
                   "reasoning.effort")
    if effort == "none":
        return None, False
    return {"minimal": "low", "xhigh": "high"}.get(effort, effort), None


# ---- the response object and its output ------------------------------------------------------
def usage(input_tokens: int, output_tokens: int, cached: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}


class OutputBuilder:
    """Builds one response's output items from parsed chat deltas, and the stream events that
    announce them, each with the next ``sequence_number``. ``response`` is the response object
    (status in_progress); its ``output`` list grows in place."""

    def __init__(self, spec: ChatSpec, response: dict[str, Any]) -> None:
        self.parser = spec.stream() if not spec.plain else None
        self.response = response
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the item receiving deltas
        self.calls: dict[int, dict[str, Any]] = {}  # tool call index -> its function_call item

    def _event(self, etype: str, **fields: Any) -> dict[str, Any]:
        event = {"type": etype, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.response["output"].index(item)}

    def start(self) -> list[dict[str, Any]]:
        snap = copy.deepcopy(self.response)
        return [self._event("response.created", response=snap), self._event("response.in_progress", response=snap)]

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.parser is None:
            pieces = [{"content": text}] if text else []
        else:
            pieces = self.parser.feed(text)
        return self._route(pieces)

    def _route(self, pieces: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for piece in pieces:
            if piece.get("reasoning_content"):
                events += self._text("reasoning", piece["reasoning_content"])
            if piece.get("content"):
                events += self._text("message", piece["content"])
            for call in piece.get("tool_calls") or []:
                events += self._call(call)
        return events

    def _open(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close("completed")
        self.response["output"].append(item)
        self.open = item
        return events + [self._event("response.output_item.added", output_index=len(self.response["output"]) - 1,
                                     item=copy.deepcopy(item))]

    def _ensure(self, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The open item of ``kind`` ("message" / "reasoning"), opened (with its one part) if needed."""
        item = self.open
        if item is not None and item["type"] == kind:
            return item, []
        if kind == "message":
            item = {"id": new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        else:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        events = self._open(item)
        item["content"].append(part)
        events.append(self._event("response.content_part.added", content_index=0, part=dict(part),
                                  **self._where(item)))
        return item, events

    def _text(self, kind: str, text: str) -> list[dict[str, Any]]:
        item, events = self._ensure(kind)
        item["content"][0]["text"] += text
        etype = "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        extra = {"logprobs": []} if kind == "message" else {}
        events.append(self._event(etype, content_index=0, delta=text, **extra, **self._where(item)))
        return events

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        fn = call.get("function") or {}
        item = self.calls.get(call["index"])
        if item is None:  # a call starts: its name is known, its arguments follow
            item = {"id": new_id("fc"), "type": "function_call", "call_id": call.get("id") or new_id("call"),
                    "name": fn.get("name") or "", "arguments": "", "status": "in_progress"}
            self.calls[call["index"]] = item
            events += self._open(item)
        piece = fn.get("arguments") or ""
        if piece:
            item["arguments"] += piece
            events.append(self._event("response.function_call_arguments.delta", delta=piece, **self._where(item)))
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        where = self._where(item)
        events = []
        if item["type"] == "function_call":
            events.append(self._event("response.function_call_arguments.done", arguments=item["arguments"], **where))
        else:
            part = item["content"][0]
            if item["type"] == "message":
                events.append(self._event("response.output_text.done", content_index=0, text=part["text"],
                                          logprobs=[], **where))
            else:
                events.append(self._event("response.reasoning_text.done", content_index=0, text=part["text"],
                                          **where))
            events.append(self._event("response.content_part.done", content_index=0, part=dict(part), **where))
        item["status"] = status
        events.append(self._event("response.output_item.done", output_index=where["output_index"],
                                  item=copy.deepcopy(item)))
        return events

    def reasoning_text(self) -> str:
        return "".join(p["text"] for o in self.response["output"] if o["type"] == "reasoning" for p in o["content"])

    def finish(self, status: str, *, usage_body: dict[str, Any] | None, error: dict[str, Any] | None = None,
               emit: bool = True) -> list[dict[str, Any]]:
        """Flush the parser, close the open item and end the response with ``status``; the terminal
        event (none for ``cancelled``) comes last."""
        events = self._route(self.parser.finish()) if self.parser is not None and status != "cancelled" else []
        if not self.response["output"] and status in ("completed", "incomplete"):
            events += self._ensure("message")[1]  # always a message, even an empty one
        events += self._close("incomplete" if status != "completed" else "completed")
        resp = self.response
        resp["status"] = status
        resp["usage"] = usage_body
        resp["error"] = error
        if status == "incomplete":
            resp["incomplete_details"] = {"reason": "max_output_tokens"}
        if status in ("completed", "incomplete"):
            resp["completed_at"] = time.time()
        if emit and status in _EVENT_OF_STATUS:
            events.append(self._event(_EVENT_OF_STATUS[status], response=copy.deepcopy(resp)))
        return events


def base_response(*, resp_id: str, model: str, body: Any, text_echo: dict[str, Any],
                  tools: list[dict[str, Any]] | None, tool_choice: Any) -> dict[str, Any]:
    """The response object before any output (``body``: the request)."""
    effort = (body.reasoning or {}).get("effort")
    return {
        "id": resp_id, "object": "response", "created_at": time.time(), "status": "in_progress",
        "background": body.background, "error": None, "incomplete_details": None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "max_tool_calls": None,
        "model": model, "output": [], "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": effort, "summary": (body.reasoning or {}).get("summary")},
        "store": body.store, "temperature": body.temperature, "text": {"format": text_echo},
        "tool_choice": tool_choice if tool_choice is not None else "auto",
        "tools": list(tools or []), "top_p": body.top_p,
        "truncation": body.truncation or "disabled", "usage": None, "user": body.user,
        "metadata": dict(body.metadata or {}), "completed_at": None,
    }
