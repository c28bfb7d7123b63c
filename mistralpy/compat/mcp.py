"""mistral.rs's MCP client classes for ``Runner(..., mcp_client_config=...)``, with its names,
fields and defaults (mistralrs-pyo3: ``McpServerSourcePy``, ``McpServerConfigPy``,
``McpClientConfigPy``). ``McpServerSourcePy.Process(...)`` etc. build the variants, as the pyo3
enum's constructors do; ``McpServerSourcePy.Sse`` is ours (mistral.rs has no SSE source).

    cfg = McpClientConfigPy(servers=[McpServerConfigPy(
        id="fs", name="Filesystem Tools",
        source=McpServerSourcePy.Process(command="npx", args=["-y", "@modelcontextprotocol/server-filesystem", "."],
                                         work_dir=None, env=None))])
    runner = Runner(which=Which.Plain(model_id=...), mcp_client_config=cfg)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mistralpy.mcp.config import (
    McpClientConfig,
    McpConfigError,
    McpServerConfig,
    McpServerSource,
    parse_config,
    parse_source,
)


class McpServerSourcePy:
    """A server's transport; build one with ``McpServerSourcePy.Http / Process / WebSocket``."""

    type: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **{k: v for k, v in vars(self).items()}}

    def to_source(self, path: str = "source") -> McpServerSource:
        return parse_source(self.to_dict(), path)


@dataclass
class _Http(McpServerSourcePy):
    url: str
    timeout_secs: int | None = None
    headers: dict[str, str] | None = None
    type = "Http"


@dataclass
class _Process(McpServerSourcePy):
    command: str
    args: list[str] = field(default_factory=list)
    work_dir: str | None = None
    env: dict[str, str] | None = None
    type = "Process"


@dataclass
class _WebSocket(McpServerSourcePy):
    url: str
    timeout_secs: int | None = None
    headers: dict[str, str] | None = None
    type = "WebSocket"


@dataclass
class _Sse(McpServerSourcePy):
    url: str
    timeout_secs: int | None = None
    headers: dict[str, str] | None = None
    type = "Sse"


for _cls, _name in ((_Http, "Http"), (_Process, "Process"), (_WebSocket, "WebSocket"), (_Sse, "Sse")):
    _cls.__name__ = _cls.__qualname__ = f"McpServerSourcePy.{_name}"
    setattr(McpServerSourcePy, _name, _cls)


@dataclass
class McpServerConfigPy:
    """Configuration for an individual MCP server."""

    id: str
    name: str
    source: McpServerSourcePy
    enabled: bool = True
    tool_prefix: str | None = None
    resources: list[str] | None = None
    bearer_token: str | None = None

    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.source, McpServerSourcePy):
            raise McpConfigError("McpServerConfigPy.source must be an McpServerSourcePy "
                                 "(McpServerSourcePy.Process(...), .Http(...), .WebSocket(...))", "source")
        return {"id": self.id, "name": self.name, "source": self.source.to_dict(), "enabled": self.enabled,
                "tool_prefix": self.tool_prefix, "resources": self.resources, "bearer_token": self.bearer_token}

    def to_server(self) -> McpServerConfig:
        return parse_config({"servers": [self.to_dict()]}).servers[0]


@dataclass
class McpClientConfigPy:
    """Configuration for MCP client integration."""

    servers: list[McpServerConfigPy]
    auto_register_tools: bool = True
    tool_timeout_secs: int | None = None
    max_concurrent_calls: int | None = None

    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.servers, (list, tuple)) or not all(isinstance(s, McpServerConfigPy)
                                                                  for s in self.servers):
            raise McpConfigError("McpClientConfigPy.servers must be a list of McpServerConfigPy", "servers")
        return {"servers": [s.to_dict() for s in self.servers], "auto_register_tools": self.auto_register_tools,
                "tool_timeout_secs": self.tool_timeout_secs, "max_concurrent_calls": self.max_concurrent_calls}

    def to_config(self) -> McpClientConfig:
        """The engine's config (validated: a bad field is an McpConfigError naming it)."""
        return parse_config(self.to_dict())
