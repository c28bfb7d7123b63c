"""MCP client configuration in mistral.rs's JSON schema (mistralrs-mcp's ``McpClientConfig``).

    {"servers": [{"name": "filesystem", "id": "fs-1", "tool_prefix": "fs", "enabled": true,
                  "bearer_token": null, "resources": ["file://**"],
                  "source": {"type": "Process", "command": "npx", "args": ["-y", "pkg", "/tmp"],
                             "env": {"K": "V"}, "work_dir": null}}],
     "auto_register_tools": true, "tool_timeout_secs": 30, "max_concurrent_calls": 10}

Sources: ``Process`` (stdio), ``Http`` (streamable HTTP; ``url``, ``headers``, ``timeout_secs``),
``WebSocket`` (same fields), and ``Sse`` (the legacy HTTP+SSE transport; not in mistral.rs).

Differences from mistral.rs, on purpose: a server without ``tool_prefix`` gets its name (or id)
as the prefix instead of a random ``mcp_<uuid>``, so tool names are stable across restarts;
``auto_register_tools`` defaults to true (mistral.rs's Python class default) instead of being
required; ``args`` may be omitted. Keys starting with ``_`` (the ``_comment`` of mistral.rs's
example files) are ignored, other unknown keys are logged. A wrong value is an ``McpConfigError``
naming the field (``servers[1].source.command``).
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistralpy.errors import InvalidRequestError

log = logging.getLogger(__name__)

DEFAULT_TOOL_TIMEOUT_S = 30.0
DEFAULT_MAX_CONCURRENT_CALLS = 10
ENV_VAR = "MCP_CONFIG_PATH"


class McpConfigError(InvalidRequestError):
    """A bad MCP client configuration; ``field`` is the path of the offending key."""


@dataclass(frozen=True)
class ProcessSource:
    """A server started as a child process, spoken to over its stdin/stdout."""

    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    work_dir: str | None = None
    type: str = field(default="Process", init=False)


@dataclass(frozen=True)
class HttpSource:
    """Streamable HTTP (the spec's HTTP transport): one endpoint URL."""

    url: str
    headers: dict[str, str] | None = None
    timeout_secs: float | None = None
    type: str = field(default="Http", init=False)


@dataclass(frozen=True)
class SseSource:
    """The 2024-11-05 HTTP+SSE transport (GET an event stream, POST messages)."""

    url: str
    headers: dict[str, str] | None = None
    timeout_secs: float | None = None
    type: str = field(default="Sse", init=False)


@dataclass(frozen=True)
class WebSocketSource:
    """JSON-RPC over a WebSocket with the ``mcp`` subprotocol (SDK 1.x only; not in the spec)."""

    url: str
    headers: dict[str, str] | None = None
    timeout_secs: float | None = None
    type: str = field(default="WebSocket", init=False)


McpServerSource = ProcessSource | HttpSource | SseSource | WebSocketSource


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    source: McpServerSource
    id: str = ""
    enabled: bool = True
    tool_prefix: str | None = None
    resources: tuple[str, ...] | None = None
    bearer_token: str | None = None

    @property
    def key(self) -> str:
        """The server's stable identifier: its id, else its name."""
        return self.id or self.name

    @property
    def prefix(self) -> str:
        """The tool name prefix: ``tool_prefix``, else the name (or id) made a valid tool name."""
        return sanitize_name(self.tool_prefix or self.name or self.id)


@dataclass(frozen=True)
class McpClientConfig:
    servers: tuple[McpServerConfig, ...] = ()
    auto_register_tools: bool = True
    tool_timeout_secs: float = DEFAULT_TOOL_TIMEOUT_S
    max_concurrent_calls: int = DEFAULT_MAX_CONCURRENT_CALLS

    @property
    def enabled_servers(self) -> list[McpServerConfig]:
        return [s for s in self.servers if s.enabled]


def sanitize_name(text: str) -> str:
    """OpenAI tool names match ``^[a-zA-Z0-9_-]{1,64}$``: anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text.strip()).strip("_") or "mcp"


# ---- parsing -------------------------------------------------------------------------------------
_TOP_KEYS = {"servers", "auto_register_tools", "tool_timeout_secs", "max_concurrent_calls"}
_SERVER_KEYS = {"id", "name", "source", "enabled", "tool_prefix", "resources", "bearer_token"}
_SOURCE_KEYS = {"Process": {"type", "command", "args", "env", "work_dir"},
                "Http": {"type", "url", "headers", "timeout_secs"},
                "Sse": {"type", "url", "headers", "timeout_secs"},
                "WebSocket": {"type", "url", "headers", "timeout_secs"}}
_TYPE_ALIASES = {"process": "Process", "stdio": "Process", "http": "Http", "streamablehttp": "Http",
                 "streamable_http": "Http", "sse": "Sse", "websocket": "WebSocket", "ws": "WebSocket"}


def _check_keys(obj: dict[str, Any], known: set[str], where: str) -> None:
    for key in obj:
        if key not in known and not str(key).startswith("_"):
            log.warning("MCP config: unknown key %s%s%s is ignored", where, "." if where else "", key)


def _str(value: Any, path: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise McpConfigError(f"MCP config: {path} must be a string, got {type(value).__name__}", path)
    return value


def _bool(value: Any, path: str, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise McpConfigError(f"MCP config: {path} must be true or false, got {value!r}", path)
    return value


def _positive(value: Any, path: str, default: float | None, integer: bool) -> Any:
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise McpConfigError(f"MCP config: {path} must be {kind}, got {value!r}", path)
    return value


def _str_map(value: Any, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise McpConfigError(f"MCP config: {path} must be an object of string values", path)
    return dict(value)


def _str_list(value: Any, path: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise McpConfigError(f"MCP config: {path} must be a list of strings", path)
    return tuple(value)


def _url(value: Any, path: str, schemes: tuple[str, ...]) -> str:
    url = _str(value, path)
    if not url or not url.lower().startswith(schemes):
        raise McpConfigError(f"MCP config: {path} must be a {' or '.join(schemes)} URL, got {url!r}", path)
    return url


def parse_source(obj: Any, path: str) -> McpServerSource:
    if not isinstance(obj, dict):
        raise McpConfigError(f"MCP config: {path} must be an object with a 'type'", path)
    raw = obj.get("type")
    kind = raw if raw in _SOURCE_KEYS else _TYPE_ALIASES.get(str(raw).lower().replace("-", ""))
    if kind is None:
        raise McpConfigError(f"MCP config: {path}.type must be one of {', '.join(_SOURCE_KEYS)}, got {raw!r}",
                             f"{path}.type")
    _check_keys(obj, _SOURCE_KEYS[kind], path)
    if kind == "Process":
        command = _str(obj.get("command"), f"{path}.command")
        if not command:
            raise McpConfigError(f"MCP config: {path}.command must not be empty", f"{path}.command")
        return ProcessSource(command=command, args=_str_list(obj.get("args"), f"{path}.args") or (),
                             env=_str_map(obj.get("env"), f"{path}.env"),
                             work_dir=_str(obj.get("work_dir"), f"{path}.work_dir", optional=True))
    schemes = ("ws://", "wss://") if kind == "WebSocket" else ("http://", "https://")
    cls = {"Http": HttpSource, "Sse": SseSource, "WebSocket": WebSocketSource}[kind]
    return cls(url=_url(obj.get("url"), f"{path}.url", schemes),
               headers=_str_map(obj.get("headers"), f"{path}.headers"),
               timeout_secs=_positive(obj.get("timeout_secs"), f"{path}.timeout_secs", None, False))


def parse_server(obj: Any, path: str) -> McpServerConfig:
    if not isinstance(obj, dict):
        raise McpConfigError(f"MCP config: {path} must be an object", path)
    _check_keys(obj, _SERVER_KEYS, path)
    name = _str(obj.get("name"), f"{path}.name", optional=True) or ""
    sid = _str(obj.get("id"), f"{path}.id", optional=True) or ""
    if not name and not sid:
        raise McpConfigError(f"MCP config: {path} needs a 'name' (or an 'id')", f"{path}.name")
    if "source" not in obj:
        raise McpConfigError(f"MCP config: {path}.source is missing", f"{path}.source")
    prefix = _str(obj.get("tool_prefix"), f"{path}.tool_prefix", optional=True)
    if prefix is not None and not prefix.strip():
        raise McpConfigError(f"MCP config: {path}.tool_prefix must not be empty", f"{path}.tool_prefix")
    return McpServerConfig(name=name or sid, id=sid or name, source=parse_source(obj["source"], f"{path}.source"),
                           enabled=_bool(obj.get("enabled"), f"{path}.enabled", True), tool_prefix=prefix,
                           resources=_str_list(obj.get("resources"), f"{path}.resources"),
                           bearer_token=_str(obj.get("bearer_token"), f"{path}.bearer_token", optional=True))


def parse_config(obj: Any) -> McpClientConfig:
    """An McpClientConfig from the decoded JSON of a mistral.rs MCP config file."""
    if not isinstance(obj, dict):
        raise McpConfigError("MCP config must be a JSON object with 'servers'", "servers")
    _check_keys(obj, _TOP_KEYS, "")
    raw = obj.get("servers")
    if not isinstance(raw, (list, tuple)):
        raise McpConfigError("MCP config: servers must be a list of server objects", "servers")
    servers = tuple(parse_server(s, f"servers[{i}]") for i, s in enumerate(raw))
    seen: dict[str, int] = {}
    for i, s in enumerate(servers):
        if s.key in seen:
            raise McpConfigError(f"MCP config: servers[{i}] has the same id {s.key!r} as servers[{seen[s.key]}]",
                                 f"servers[{i}].id")
        seen[s.key] = i
    return McpClientConfig(
        servers=servers, auto_register_tools=_bool(obj.get("auto_register_tools"), "auto_register_tools", True),
        tool_timeout_secs=float(_positive(obj.get("tool_timeout_secs"), "tool_timeout_secs",
                                          DEFAULT_TOOL_TIMEOUT_S, False)),
        max_concurrent_calls=_positive(obj.get("max_concurrent_calls"), "max_concurrent_calls",
                                       DEFAULT_MAX_CONCURRENT_CALLS, True))


def load_config(value: Any) -> McpClientConfig | None:
    """The config from a file path, a JSON string, a dict, an McpClientConfig or mistral.rs's
    ``McpClientConfigPy``; None for None / "" / False."""
    if value is None or value is False or value == "":
        return None
    if isinstance(value, McpClientConfig):
        return value
    to_config = getattr(value, "to_config", None)  # mistralpy.compat.mcp.McpClientConfigPy
    if callable(to_config):
        return to_config()
    if isinstance(value, dict):
        return parse_config(value)
    if isinstance(value, (str, os.PathLike)):
        text = str(value)
        if text.lstrip().startswith("{"):
            source, body = "the mcp_config string", text
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise McpConfigError(f"MCP config file {text!r} not found", "mcp_config")
            source, body = str(path), path.read_text(encoding="utf-8")
        try:
            obj = json.loads(body)
        except ValueError as exc:
            raise McpConfigError(f"MCP config {source} is not valid JSON: {exc}", "mcp_config") from exc
        return parse_config(obj)
    raise McpConfigError("mcp_config must be a file path, a dict or an McpClientConfigPy, "
                         f"got {type(value).__name__}", "mcp_config")


def config_from_env() -> McpClientConfig | None:
    """The config named by ``MCP_CONFIG_PATH`` (mistral.rs's variable), if set."""
    path = os.environ.get(ENV_VAR)
    return load_config(path) if path else None


def config_to_dict(config: McpClientConfig) -> dict[str, Any]:
    """Back to mistral.rs's JSON shape (the inverse of parse_config)."""
    def source(s: McpServerSource) -> dict[str, Any]:
        if isinstance(s, ProcessSource):
            return {"type": "Process", "command": s.command, "args": list(s.args), "env": s.env,
                    "work_dir": s.work_dir}
        return {"type": s.type, "url": s.url, "headers": s.headers, "timeout_secs": s.timeout_secs}

    return {"servers": [{"id": s.id, "name": s.name, "source": source(s.source), "enabled": s.enabled,
                         "tool_prefix": s.tool_prefix, "resources": list(s.resources) if s.resources else None,
                         "bearer_token": s.bearer_token} for s in config.servers],
            "auto_register_tools": config.auto_register_tools, "tool_timeout_secs": config.tool_timeout_secs,
            "max_concurrent_calls": config.max_concurrent_calls}
