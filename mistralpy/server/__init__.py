"""OpenAI-compatible HTTP server on AsyncEngine (``mistralpy serve``)."""
from mistralpy.server.app import ServerOptions, create_app

__all__ = ["ServerOptions", "create_app"]
