"""`mistralpy serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn) on one model, or on
several from a TOML file (`--config models.toml`, see server/registry.py for its format)."""
from __future__ import annotations

import argparse
import logging

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
                            responses_db=getattr(args, "responses_db", None))
    app = create_app(registry, options)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        registry.shutdown()
    return 0
