"""MCP (Model Context Protocol) client: external tool servers whose tools the model can call.

    from mistralpy import Engine
    engine = Engine("Qwen/Qwen3-4B", mcp_config="mcp.json")   # mistral.rs's config format
    engine.chat([{"role": "user", "content": "List /tmp"}])     # MCP tools run inside chat()

Configuration: mistralpy/mcp/config.py (mistral.rs's JSON schema; also ``MCP_CONFIG_PATH`` and
``mistralpy run|serve --mcp-config FILE``). Connections, reconnection, timeouts and concurrency:
client.py. Tool naming and schemas: tools.py. Results: results.py.

Built on the official ``mcp`` SDK, major version 1 (pinned ``mcp[ws]>=1.30,<2`` in pyproject.toml),
chosen over 2.x on purpose: mistral.rs's config has a ``WebSocket`` source, and only 1.x still has
a WebSocket client (2.0 removed it); 2.x also renamed FastMCP to MCPServer, moved the types into a
separate ``mcp-types`` package with snake_case fields and pulls in ``httpx2`` and OpenTelemetry,
while 1.x runs on the httpx / starlette / pydantic this project already uses. The 1.x line still
gets security and bug fixes. Moving to 2.x later touches transports.py, the ``inputSchema`` /
``isError`` style field names (tools.py, results.py) and the test servers.
"""
from mistralpy.mcp.client import McpClient
from mistralpy.mcp.config import (ENV_VAR, HttpSource, McpClientConfig, McpConfigError, McpServerConfig,
                                  McpServerSource, ProcessSource, SseSource, WebSocketSource, config_from_env,
                                  load_config, parse_config)
from mistralpy.mcp.results import McpToolResult
from mistralpy.mcp.tools import McpTool

__all__ = ["ENV_VAR", "HttpSource", "McpClient", "McpClientConfig", "McpConfigError", "McpServerConfig",
           "McpServerSource", "McpTool", "McpToolResult", "ProcessSource", "SseSource", "WebSocketSource",
           "config_from_env", "load_config", "parse_config"]
