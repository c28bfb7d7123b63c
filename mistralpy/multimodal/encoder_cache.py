"""Encoder outputs kept between steps, keyed by the item's content hash.

An image is encoded once (the first step whose prompt chunk touches its placeholder run) and its
rows are scattered into the decoder's input embeddings for that chunk and every later chunk of the
same prompt, and for any later request with the same image and settings. The budget is counted in
embedding rows; an entry referenced by a request in flight is never evicted (a request's chunks
must find their rows), unreferenced ones are evicted least recently used first.
"""
from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, budget_rows: int) -> None:
        self.budget_rows = budget_rows
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._refs: dict[str, set[str]] = {}       # hash -> ids of requests using it
        self._by_request: dict[str, set[str]] = {}  # request id -> hashes it holds
        self.rows = 0
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str, request_id: str) -> torch.Tensor | None:
        """The cached rows (and a reference for ``request_id``), or None."""
        rows = self._entries.get(key)
        if rows is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        self._ref(key, request_id)
        return rows

    def put(self, key: str, rows: torch.Tensor, request_id: str) -> None:
        if key not in self._entries:
            self._entries[key] = rows
            self.rows += rows.shape[0]
        self._entries.move_to_end(key)
        self._ref(key, request_id)
        self._evict()

    def release(self, request_id: str) -> None:
        """A request finished, aborted or was preempted: drop its references."""
        for key in self._by_request.pop(request_id, ()):
            users = self._refs.get(key)
            if users is not None:
                users.discard(request_id)
                if not users:
                    del self._refs[key]
        self._evict()

    def _ref(self, key: str, request_id: str) -> None:
        self._refs.setdefault(key, set()).add(request_id)
        self._by_request.setdefault(request_id, set()).add(key)

    def _evict(self) -> None:
        if self.rows <= self.budget_rows:
            return
        for key in list(self._entries):
            if self.rows <= self.budget_rows:
                break
            if key in self._refs:
                continue
            self.rows -= self._entries.pop(key).shape[0]

    def referenced(self, request_id: str) -> set[str]:
        return set(self._by_request.get(request_id, ()))
