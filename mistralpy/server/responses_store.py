"""Stored Responses API responses, in SQLite (stdlib ``sqlite3``).

Each row keeps the response object, its own input items and the context it inherited through
``previous_response_id`` (the whole earlier conversation), so a chain stays usable even when an
older link is evicted or deleted. The default database is in memory with an LRU bound on the
number of rows; with a path (``mistralpy serve --responses-db PATH``) rows survive a restart.
"""
from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any

from mistralpy.server.errors import APIError

DEFAULT_MAX_ENTRIES = 1000  # the in-memory store's LRU bound

_SCHEMA = """CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,      -- the response object (JSON)
    input TEXT NOT NULL,     -- its own input items (JSON list)
    context TEXT NOT NULL,   -- the items inherited through previous_response_id (JSON list)
    used INTEGER NOT NULL    -- LRU clock
)"""


def not_found(resp_id: str) -> APIError:
    return APIError(404, f"No response found with id {resp_id!r}.", "response_id", "response_not_found")


class ResponseStore:
    """Thread-safe (one connection behind a lock: the calls are short and the server is one process)."""

    def __init__(self, path: str | None = None, max_entries: int | None = None) -> None:
        self.path = path or ":memory:"
        # A file keeps everything unless a bound is asked for; memory is bounded by default.
        self.max_entries = max_entries if max_entries is not None else (None if path else DEFAULT_MAX_ENTRIES)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        if path:
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._clock = self._db.execute("SELECT COALESCE(MAX(used), 0) FROM responses").fetchone()[0]
        if path:
            self._fail_unfinished()

    def _fail_unfinished(self) -> None:
        """Responses an earlier server process left running can never finish: mark them failed."""
        for resp_id, text in self._db.execute("SELECT id, body FROM responses").fetchall():
            body = json.loads(text)
            if body.get("status") in ("queued", "in_progress"):
                body["status"] = "failed"
                body["error"] = {"code": "server_error", "message": "the server stopped before this response finished"}
                self._db.execute("UPDATE responses SET body = ? WHERE id = ?", (json.dumps(body), resp_id))

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def put(self, body: dict[str, Any], input_items: list[dict[str, Any]] | None = None,
            context: list[dict[str, Any]] | None = None) -> None:
        """Insert, or update a stored response's body (``input_items`` None keeps its items)."""
        with self._lock:
            if input_items is None:
                self._db.execute("UPDATE responses SET body = ?, used = ? WHERE id = ?",
                                 (json.dumps(body), self._tick(), body["id"]))
                return
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?)",
                             (body["id"], json.dumps(body), json.dumps(input_items), json.dumps(context or []),
                              self._tick()))
            if self.max_entries is not None:
                self._db.execute("DELETE FROM responses WHERE id NOT IN "
                                 "(SELECT id FROM responses ORDER BY used DESC LIMIT ?)", (self.max_entries,))

    def _row(self, resp_id: str, columns: str) -> tuple:
        with self._lock:
            row = self._db.execute(f"SELECT {columns} FROM responses WHERE id = ?", (resp_id,)).fetchone()
            if row is None:
                raise not_found(resp_id)
            self._db.execute("UPDATE responses SET used = ? WHERE id = ?", (self._tick(), resp_id))
        return row

    def get(self, resp_id: str) -> dict[str, Any]:
        return json.loads(self._row(resp_id, "body")[0])

    def input_items(self, resp_id: str) -> list[dict[str, Any]]:
        return json.loads(self._row(resp_id, "input")[0])

    def conversation(self, resp_id: str) -> list[dict[str, Any]]:
        """The items a follow-up of ``resp_id`` continues: its context, its input and its output."""
        from mistralpy.server.responses_format import output_to_items

        body, items, context = self._row(resp_id, "body, input, context")
        return json.loads(context) + json.loads(items) + output_to_items(json.loads(body)["output"])

    def delete(self, resp_id: str) -> None:
        with self._lock:
            if self._db.execute("DELETE FROM responses WHERE id = ?", (resp_id,)).rowcount == 0:
                raise not_found(resp_id)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
