"""`mistralpy serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) on one model, or on
several from a TOML file (`--config models.toml`, see server/registry.py for its format)."""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import Any

from mistralpy.cli.main import add_model_args, engine_kwargs

log = logging.getLogger(__name__)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--config", metavar="TOML",
                   help="serve several models from a TOML file of [[models]] tables (name, model, default, aliases "
                        "and any engine option: gguf_file, isq, dtype, max_seqs, ...); requests pick one by their "
                        "'model' ('default' = the default one); -m and the model options are then ignored")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=1234, help="port (default: 1234)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every API route "
                                     "(/health, /metrics and the docs stay open)")
    s.add_argument("--mcp-port", type=int, metavar="PORT",
                   help="also serve the models as MCP tools (chat, complete, list_models; streamable HTTP at "
                        "/mcp) on this port, beside the HTTP API; /mcp is on the main port too")
    s.add_argument("--served-model-name", help="model id shown in /v1/models and accepted in requests "
                                               "(default: the -m value; 'default' is always accepted)")
    s.add_argument("--cors-origins", nargs="*", default=[], metavar="ORIGIN",
                   help="allowed CORS origins, e.g. '*' (default: none, CORS off)")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="request body size limit in MB (default: 16)")
    s.add_argument("--max-media-mb", type=float, default=20.0,
                   help="size limit of one fetched image or data: URL in MB (default: 20)")
    s.add_argument("--allowed-media-domains", nargs="*", default=[], metavar="HOST",
                   help="fetch image URLs from these hosts only (they may then resolve to private addresses)")
    s.add_argument("--allow-private-media", action="store_true",
                   help="let image URLs reach loopback / private / link-local addresses (off: the SSRF guard refuses them)")
    s.add_argument("--responses-db", metavar="PATH",
                   help="SQLite file keeping stored /v1/responses across restarts (default: in memory, the "
                        "last 1000 kept)")
    s.add_argument("--max-tool-rounds", type=int, default=8,
                   help="rounds of server-side tool calls (MCP, dispatch URL, search) per chat request; a "
                        "request's max_tool_rounds overrides it (default: 8)")
    s.add_argument("--log-interval", type=float, default=5.0,
                   help="seconds between throughput log lines while busy (0 = off; default: 5)")


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from mistralpy.cli.progress import LoadProgress
    from mistralpy.engine.async_engine import AsyncEngine
    from mistralpy.server.app import ServerOptions, create_app
    from mistralpy.server.registry import ModelRegistry, load_config

    # Loading and the throughput line are the server's heartbeat: show them even without -v.
    for name in ("mistralpy.server", __name__):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.config:
        if args.model:
            log.warning("--config given: -m %s is ignored", args.model)
        specs = load_config(args.config)
        for spec in specs:
            spec.options.setdefault("progress", LoadProgress())
        registry = ModelRegistry.from_specs(specs)
    else:
        log.info("loading %s", args.model)
        engine = AsyncEngine(args.model, **engine_kwargs(args), progress=LoadProgress())
        registry = ModelRegistry.from_engine(engine, args.served_model_name)
    options = ServerOptions(served_model_name=args.served_model_name, api_key=args.api_key,
                            cors_origins=tuple(args.cors_origins), max_body_bytes=int(args.max_body_mb * 2**20),
                            log_interval_s=args.log_interval, max_media_bytes=int(args.max_media_mb * 2**20),
                            allowed_media_domains=tuple(args.allowed_media_domains),
                            allow_private_media=args.allow_private_media,
                            max_num_images=getattr(args, "max_num_images", 8),
                            responses_db=getattr(args, "responses_db", None),
                            max_tool_rounds=args.max_tool_rounds)
    app = create_app(registry, options)
    mcp_port = getattr(args, "mcp_port", None)
    try:
        if mcp_port is None:
            uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
        else:
            if mcp_port == args.port:
                raise SystemExit("--mcp-port must differ from --port (/mcp is served on --port already)")
            from mistralpy.server.mcp_server import create_mcp_app

            log.info("MCP endpoint: http://%s:%d/mcp", args.host, mcp_port)
            asyncio.run(serve_apps([(app, args.port), (create_mcp_app(app.state.server), mcp_port)], args.host))
    finally:
        registry.shutdown()
    return 0


def _uvicorn_server(app: Any, host: str, port: int) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # serve_apps handles the signals, for all servers at once

    return Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5))


async def serve_apps(apps: list[tuple[Any, int]], host: str) -> None:
    """Run one uvicorn server per (app, port) in this event loop; they start and stop together: a
    signal stops all (a second one forces it), and so does any server ending on its own."""
    servers = [_uvicorn_server(app, host, port) for app, port in apps]

    def stop_all() -> None:
        for server in servers:
            server.force_exit = server.should_exit  # a second signal: stop waiting for connections
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # (not the main thread; Windows)
            loop.add_signal_handler(sig, stop_all)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
