"""The server's shared state, stored on ``app.state.server``."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.server.metrics import ServerMetrics


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    served_name: str
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    aliases: tuple[str, ...] = ()

    @property
    def model_names(self) -> set[str]:
        """Names a request's ``model`` may use: the served name, the engine's model id, "default"."""
        return {self.served_name, self.engine.model_name, "default", *self.aliases}
