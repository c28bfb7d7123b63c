"""The models one server serves: a TOML config (``mistralpy serve --config models.toml``), the
registry that maps a request's ``model`` to a loaded engine, and unload / reload.

    default = "small"              # optional: else the entry with default = true, else the first
    [[models]]
    name = "small"                 # the id clients send (and see in GET /v1/models)
    model = "HuggingFaceTB/SmolLM2-135M-Instruct"   # hub id, folder or .gguf file (also: m)
    isq = "Q8_0"                   # any Engine option: gguf_file, dtype, max_seqs, max_model_len, ...
    aliases = ["smol"]
    [[models]]
    name = "qwen"
    model = "Qwen/Qwen3-0.6B"
    default = true
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistralpy.engine.async_engine import AsyncEngine
from mistralpy.engine.builder import EngineOptions
from mistralpy.errors import InvalidRequestError, ModelLoadError
from mistralpy.server.errors import APIError
from mistralpy.server.metrics import ServerMetrics, log_throughput

log = logging.getLogger(__name__)

_ENGINE_KEYS = {f.name for f in dataclasses.fields(EngineOptions)}
_KEY_ALIASES = {"m": "model", "gguf": "gguf_file", "f": "gguf_file", "in_situ_quant": "isq"}


@dataclass(slots=True)
class ModelSpec:
    """One served model: its name, what to load and the Engine options to load it with."""

    name: str
    model: str
    options: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    default: bool = False


def load_config(path: str | Path) -> list[ModelSpec]:
    """Read a models TOML file. Exactly one spec comes back with ``default=True``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelLoadError(f"cannot read model config {path}: {exc}") from exc
    entries = data.get("models")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InvalidRequestError(f"{path}: needs one or more [[models]] tables", "models")
    specs: list[ModelSpec] = []
    for i, raw in enumerate(entries):
        entry = {_KEY_ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in raw.items()}
        name, model = entry.pop("name", None), entry.pop("model", None)
        where = f"{path}: models[{i}]"
        if not isinstance(model, str) or not model:
            raise InvalidRequestError(f"{where} needs model = \"hub id, folder or .gguf file\"", "model")
        name = name or model
        aliases = entry.pop("aliases", [])
        aliases = (aliases,) if isinstance(aliases, str) else tuple(aliases)
        default = bool(entry.pop("default", False))
        unknown = sorted(set(entry) - _ENGINE_KEYS)
        if unknown:
            raise InvalidRequestError(f"{where} ({name}): unknown keys {unknown}; Engine options are "
                                      f"{sorted(_ENGINE_KEYS)}", unknown[0])
        specs.append(ModelSpec(name, model, entry, aliases, default))
    names = [n for s in specs for n in (s.name, *s.aliases)]
    dupes = sorted({n for n in names if names.count(n) > 1} | ({"default"} & set(names)))
    if dupes:
        raise InvalidRequestError(f"{path}: model names must be unique and not 'default': {dupes}", "name")
    chosen = data.get("default")
    if chosen is not None:
        if chosen not in {s.name for s in specs}:
            raise InvalidRequestError(f"{path}: default = {chosen!r} names no model", "default")
        for s in specs:
            s.default = s.name == chosen
    marked = [s for s in specs if s.default]
    if len(marked) > 1:
        raise InvalidRequestError(f"{path}: several models marked default: {[s.name for s in marked]}", "default")
    if not marked:
        specs[0].default = True
    return specs


@dataclass(slots=True)
class ModelEntry:
    """What the routes use for one model: its engine (None while unloaded), name and metrics."""

    spec: ModelSpec
    engine: AsyncEngine | None
    metrics: ServerMetrics
    created: int = field(default_factory=lambda: int(time.time()))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    log_task: asyncio.Task | None = None

    @property
    def served_name(self) -> str:
        return self.spec.name

    @property
    def loaded(self) -> bool:
        return self.engine is not None

    def matches(self, requested: str) -> bool:
        return requested in (self.spec.name, self.spec.model, *self.spec.aliases) or (
            self.engine is not None and requested == self.engine.model_name)


class ModelRegistry:
    """Name -> ModelEntry, with a default. Loading and unloading run off the event loop."""

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        self.entries: dict[str, ModelEntry] = {}
        self.default_name: str | None = None
        # One set of HTTP-level metrics for the server; /metrics reads engine values of the default model.
        self.metrics = metrics or ServerMetrics("mistralpy")
        self.log_interval_s = 0.0

    # ---- building ----------------------------------------------------------------------------
    def add(self, spec: ModelSpec, engine: AsyncEngine | None) -> ModelEntry:
        if spec.name in self.entries or spec.name == "default":
            raise InvalidRequestError(f"model name {spec.name!r} is taken", "name")
        entry = ModelEntry(spec, engine, self.metrics)
        self.entries[spec.name] = entry
        if spec.default or self.default_name is None:
            self.default_name = spec.name
        return entry

    @classmethod
    def from_engine(cls, engine: AsyncEngine, name: str | None = None, aliases: tuple[str, ...] = ()) -> ModelRegistry:
        """One already loaded engine (``create_app(engine)``); reload uses the engine's own options."""
        opts = engine.engine.options
        options = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
        registry = cls(ServerMetrics(engine.model_name))
        registry.add(ModelSpec(name or engine.model_name, engine.model_name, options, aliases, True), engine)
        return registry

    @classmethod
    def from_specs(cls, specs: list[ModelSpec]) -> ModelRegistry:
        """Load every model (in order; a failure shuts down the ones already loaded)."""
        registry = cls()
        try:
            for spec in specs:
                log.info("loading model %r from %s", spec.name, spec.model)
                registry.add(spec, AsyncEngine(spec.model, **spec.options))
        except BaseException:
            registry.shutdown()
            raise
        return registry

    # ---- lookup --------------------------------------------------------------------------------
    @property
    def default(self) -> ModelEntry:
        assert self.default_name is not None, "empty registry"
        return self.entries[self.default_name]

    def get(self, requested: str | None) -> ModelEntry:
        """The entry for a request's ``model``: None, "" and "default" mean the default model.
        404 when no model has that name, 503 when it is unloaded."""
        entry = self.find(requested)
        if not entry.loaded:
            raise APIError(503, f"the model {entry.served_name!r} is unloaded; POST /v1/models/"
                                f"{entry.served_name}/reload to load it", "model", "model_unloaded")
        return entry

    def find(self, requested: str | None) -> ModelEntry:
        if not requested or requested == "default":
            return self.default
        entry = self.entries.get(requested) or next((e for e in self.entries.values() if e.matches(requested)), None)
        if entry is None:
            raise APIError(404, f"the model {requested!r} does not exist (served: {sorted(self.entries)})",
                           "model", "model_not_found")
        return entry

    # ---- unload / reload -------------------------------------------------------------------------
    async def unload(self, requested: str) -> ModelEntry:
        """Shut the model's engine down (its running requests end with an engine error) and free it."""
        entry = self.find(requested)
        async with entry.lock:
            if entry.engine is not None:
                engine, entry.engine = entry.engine, None
                self._stop_logging(entry)
                log.info("unloading model %r", entry.served_name)
                await asyncio.to_thread(engine.shutdown)
        return entry

    async def reload(self, requested: str) -> ModelEntry:
        """Load an unloaded model again from its spec (a loaded one is left as it is)."""
        entry = self.find(requested)
        async with entry.lock:
            if entry.engine is None:
                log.info("loading model %r from %s", entry.served_name, entry.spec.model)
                entry.engine = await asyncio.to_thread(AsyncEngine, entry.spec.model, **entry.spec.options)
                entry.created = int(time.time())
                self._start_logging(entry)
        return entry

    # ---- throughput log lines, one task per loaded model ---------------------------------------
    def start_logging(self, interval_s: float) -> None:
        self.log_interval_s = interval_s
        for entry in self.entries.values():
            self._start_logging(entry)

    def _start_logging(self, entry: ModelEntry) -> None:
        if self.log_interval_s and entry.engine is not None and entry.log_task is None:
            entry.log_task = asyncio.create_task(log_throughput(entry.engine, self.log_interval_s))

    def _stop_logging(self, entry: ModelEntry) -> None:
        if entry.log_task is not None:
            entry.log_task.cancel()
            entry.log_task = None

    def stop_logging(self) -> None:
        for entry in self.entries.values():
            self._stop_logging(entry)

    def shutdown(self) -> None:
        """Shut every loaded engine down (the server's owner calls this after it stops)."""
        for entry in self.entries.values():
            if entry.engine is not None:
                entry.engine.shutdown()
                entry.engine = None
