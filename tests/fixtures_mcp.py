"""MCP test servers: tests/mcp_servers/tool_server.py (the official SDK's FastMCP) over stdio, or
started on a free local port over streamable HTTP, SSE and WebSocket; and the npm filesystem server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TOOL_SERVER = Path(__file__).parent / "mcp_servers" / "tool_server.py"
NPM_FILESYSTEM = "@modelcontextprotocol/server-filesystem"
# The SDK server's fixed answer of its `secret` tool
SECRET = "MARKER-7431-tangerine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stdio_source(name: str = "py", pidfile: Path | None = None) -> dict[str, Any]:
    """A mistral.rs Process source running the SDK test server as ``name``."""
    env = {"MCP_TEST_PIDFILE": str(pidfile)} if pidfile is not None else None
    return {"type": "Process", "command": sys.executable, "args": [str(TOOL_SERVER), "stdio", name],
            "env": env, "work_dir": str(TOOL_SERVER.parent)}


@contextmanager
def network_servers(*modes: str, timeout_s: float = 40.0) -> Iterator[list[dict[str, str]]]:
    """Run one SDK test server per mode on free ports, started together: "http" (streamable HTTP)
    or "all" (streamable HTTP, SSE and WebSocket). Yields each one's {transport: URL}."""
    procs, urls, ports = [], [], []
    try:
        for mode in modes:
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, str(TOOL_SERVER), mode, str(port), mode],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
            base = f"127.0.0.1:{port}"
            urls.append({"http": f"http://{base}/mcp", "sse": f"http://{base}/sse", "ws": f"ws://{base}/ws"})
            ports.append(port)
        deadline = time.monotonic() + timeout_s
        for mode, proc, port in zip(modes, procs, ports):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"MCP test server ({mode}) exited: {proc.stderr.read().decode()[-2000:]}")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"MCP test server ({mode}) did not listen on {port}") from None
                    time.sleep(0.1)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def npm_filesystem_source(folder: Path) -> dict[str, Any] | None:
    """The npm filesystem server as a Process source (``npx -y``), or None without npx."""
    npx = shutil.which("npx")
    if npx is None:
        return None
    return {"type": "Process", "command": npx, "args": ["-y", NPM_FILESYSTEM, str(folder)]}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def pids(pidfile: Path) -> list[int]:
    return [int(x) for x in pidfile.read_text().split()] if pidfile.exists() else []
