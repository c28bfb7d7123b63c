"""``--tool-dispatch-url URL`` / ``Engine(tool_dispatch_url=...)``: tools run by the operator's own
HTTP endpoint. Each call is POSTed as ``{"name": ..., "arguments": {...}}`` (the arguments as a
JSON object); a 2xx reply is the result (a JSON body as JSON text, a JSON string as that string,
anything else as text); a non-2xx status, a timeout or a connection failure is an error result.

Which tools the endpoint has: ``tool_dispatch_tools`` (``--tool-dispatch-tools FILE``), a JSON file
or list of OpenAI function tools (``{"type": "function", "function": {...}}``, or bare function
objects); without it, ``GET URL`` once at start-up must answer that list (or ``{"tools": [...]}``).

The URL is configured by the operator, not by requests, so it is not sent through the media SSRF
guard (it is usually a local or private service); redirects are not followed and environment
proxies are not used.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx

from mistralpy.engine.tool_rounds import ToolContext, ToolOutcome, parse_arguments
from mistralpy.errors import InvalidRequestError

log = logging.getLogger(__name__)
_MAX_REPLY_CHARS = 100_000  # a runaway endpoint does not flood the prompt


def load_tool_definitions(value: Any, source: str) -> list[dict[str, Any]]:
    """OpenAI tool definitions from a list, a ``{"tools": [...]}`` object, JSON text or a file path."""
    if isinstance(value, (str, Path)) and not str(value).lstrip().startswith(("[", "{")):
        try:
            value = Path(value).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidRequestError(f"tool_dispatch_tools: cannot read {value}: {exc}", "tool_dispatch_tools") from exc
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequestError(f"{source}: not JSON: {exc}", "tool_dispatch_tools") from exc
    if isinstance(value, dict) and "tools" in value:
        value = value["tools"]
    if not isinstance(value, list):
        raise InvalidRequestError(f"{source}: expected a list of OpenAI tools", "tool_dispatch_tools")
    tools = []
    for i, item in enumerate(value):
        fn = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise InvalidRequestError(f"{source}: tools[{i}] needs function.name", "tool_dispatch_tools")
        fn = dict(fn)
        fn.setdefault("parameters", {"type": "object", "properties": {}})
        tools.append({"type": "function", "function": fn})
    return tools


class DispatchTools:
    """A tool provider (engine/tool_rounds.ToolProvider) that POSTs each call to ``url``."""

    def __init__(self, url: str, tools: list[dict[str, Any]], timeout_s: float = 30.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidRequestError(f"tool_dispatch_url must be an http(s) URL, got {url!r}", "tool_dispatch_url")
        self.url, self.timeout_s = url, timeout_s
        self.tools = tools
        self.names = {t["function"]["name"] for t in tools}

    @classmethod
    def from_options(cls, url: str, tools: Any, timeout_s: float = 30.0) -> DispatchTools:
        source = "tool_dispatch_tools" if tools is not None else f"GET {url}"
        if tools is None:
            tools = cls._discover(url, timeout_s)
        defs = load_tool_definitions(tools, source)
        log.info("tool dispatch %s: %d tools (%s)", url, len(defs), ", ".join(sorted(t["function"]["name"] for t in defs)))
        return cls(url, defs, timeout_s)

    @staticmethod
    def _discover(url: str, timeout_s: float) -> Any:
        """GET the URL for its tool list (start-up, once): a failure is a configuration error."""
        try:
            with httpx.Client(timeout=timeout_s, trust_env=False) as client:
                resp = client.get(url, headers={"accept": "application/json"})
                resp.raise_for_status()
                return resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise InvalidRequestError(f"tool_dispatch_url {url}: GET for the tool list failed ({exc}); "
                                      "give the definitions with tool_dispatch_tools (--tool-dispatch-tools FILE)",
                                      "tool_dispatch_url") from exc

    def definitions(self) -> list[dict[str, Any]]:
        return self.tools

    def has(self, name: str) -> bool:
        return name in self.names

    async def call(self, name: str, arguments: str, ctx: ToolContext) -> ToolOutcome:
        try:
            args = parse_arguments(name, arguments)
        except ValueError as exc:
            return ToolOutcome.error(str(exc))
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, trust_env=False) as client:
                resp = await client.post(self.url, json={"name": name, "arguments": args})
        except httpx.TimeoutException:
            return ToolOutcome.error(f"tool {name}: the dispatch endpoint timed out after {self.timeout_s:g} s")
        except httpx.HTTPError as exc:
            return ToolOutcome.error(f"tool {name}: dispatch request failed: {type(exc).__name__}: {exc}")
        text = resp.text[:_MAX_REPLY_CHARS]
        if not resp.is_success:
            return ToolOutcome.error(f"tool {name}: the dispatch endpoint answered HTTP {resp.status_code}: "
                                     f"{text[:500]}")
        if "json" in resp.headers.get("content-type", ""):
            try:
                body = resp.json()
            except ValueError:
                pass
            else:
                text = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
        return ToolOutcome(text, text)
