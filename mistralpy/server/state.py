"""The server's shared state, stored on ``app.state.server``: the model registry and options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.server.metrics import ServerMetrics
from mistralpy.server.registry import ModelEntry, ModelRegistry


@dataclass(slots=True)
class ServerState:
    registry: ModelRegistry
    options: Any = None   # server/app.ServerOptions (media policy, limits)

    def model(self, requested: str | None) -> ModelEntry:
        """The loaded model a request names (None / "default": the default); 404 unknown, 503 unloaded."""
        return self.registry.get(requested)

    @property
    def metrics(self) -> ServerMetrics:
        return self.registry.metrics

    # The default model's views, as the single-model server had them.
    @property
    def engine(self) -> AsyncEngine | None:
        return self.registry.default.engine

    @property
    def served_name(self) -> str:
        return self.registry.default.served_name
