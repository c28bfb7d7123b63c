"""EngineLoop: one background thread that owns the EngineCore and steps it while there is work.

Callers on any thread (or an asyncio loop) submit requests with a sink callback and may abort
them; the sink receives every SeqUpdate of its requests from the loop thread.

The core is *built* on the loop thread too (``EngineLoop.start``), so that every heavy torch call,
weight loading and prepacking included, runs on that one thread. libgomp keeps one worker pool per
calling thread; once the main thread owns a pool as well, more threads are managed than there are
cores and libgomp stops spinning between parallel regions, which made every decode step ~60%
slower on 2 cores (a 3072x576 bf16 product: 53 us on the loading thread, 130-150 us elsewhere).
"""
from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from mistralpy.core.request import Request
from mistralpy.engine.core import EngineCore, SeqUpdate
from mistralpy.errors import EngineDeadError

log = logging.getLogger(__name__)

Sink = Callable[[SeqUpdate], None]


@dataclass(slots=True)
class _Pending:
    reqs: list[Request]
    sink: Sink


class EngineLoop:
    def __init__(self, core: EngineCore | None = None, build: Callable[[], EngineCore] | None = None) -> None:
        """Own ``core``, or build it with ``build()`` on the loop thread (prefer ``EngineLoop.start``)."""
        if (core is None) == (build is None):
            raise ValueError("pass exactly one of core / build")
        self.core = core  # type: ignore[assignment]
        self._build = build
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self._cond = threading.Condition()
        self._adds: list[_Pending] = []
        self._aborts: list[str] = []
        self._sinks: dict[str, Sink] = {}
        self._stopped = False
        self.dead_error: str | None = None
        self._thread = threading.Thread(target=self._run, name="mistralpy-engine", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, build: Callable[[], EngineCore]) -> EngineLoop:
        """Start the thread, build the core on it and wait; the build's exception is re-raised here."""
        loop = cls(build=build)
        loop._built.wait()
        if loop._build_error is not None:
            raise loop._build_error
        return loop

    def submit(self, reqs: list[Request], sink: Sink) -> None:
        with self._cond:
            if self._stopped:
                raise EngineDeadError(self.dead_error or "the engine has been shut down")
            self._adds.append(_Pending(reqs, sink))
            self._cond.notify()

    def abort(self, request_ids: list[str]) -> None:
        with self._cond:
            self._aborts.extend(request_ids)
            self._cond.notify()

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _drain_inputs(self) -> None:
        with self._cond:
            while not self._stopped and not self._adds and not self._aborts and not self.core.has_work():
                self._cond.wait()
            adds, self._adds = self._adds, []
            aborts, self._aborts = self._aborts, []
        for pending in adds:
            for req in pending.reqs:
                self._sinks[req.request_id] = pending.sink
                self.core.add_request(req)
        for rid in aborts:
            for req in self.core.abort(rid):
                sink = self._sinks.pop(req.request_id, None)
                if sink is not None:
                    self._deliver(sink, SeqUpdate(req, finished=True))

    def _deliver(self, sink: Sink, update: SeqUpdate) -> None:
        try:
            sink(update)
        except Exception:  # a broken consumer must not stop the engine
            log.exception("output sink failed for %s", update.req.request_id)

    def _run(self) -> None:
        if self._build is not None:
            try:
                self.core = self._build()
            except BaseException as exc:  # noqa: BLE001 - handed to the thread that asked for the engine
                self._build_error = exc
                self._stopped = True
                return
            finally:
                self._build = None
                self._built.set()
        while True:
            self._drain_inputs()
            if self._stopped:
                break
            if not self.core.has_work():
                continue
            try:
                updates = self.core.step()
            except Exception as exc:  # noqa: BLE001 - isolate the failure to the requests in flight
                log.error("engine step failed: %s\n%s", exc, traceback.format_exc())
                updates = self.core.fail_all(f"engine step failed: {exc}")
            for update in updates:
                sink = self._sinks.get(update.req.request_id)
                if update.finished:
                    self._sinks.pop(update.req.request_id, None)
                if sink is not None:
                    self._deliver(sink, update)
        # Shut down: finish whatever is left so no caller waits forever.
        for update in self.core.fail_all("the engine was shut down"):
            sink = self._sinks.pop(update.req.request_id, None)
            if sink is not None:
                self._deliver(sink, update)
