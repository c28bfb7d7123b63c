"""KV block pool: reference counts, an LRU free list and the prefix-cache hash table.

A block whose ref count drops to 0 goes to the tail of the free list but keeps its hash, so a
later request with the same prefix can take it back ("touch"). Allocation pops from the head
(least recently freed) and only then forgets the block's hash.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None  # set once the block is full and its content is known


def hash_block(parent_hash: int | None, token_ids: Sequence[int], extra: object = None) -> int:
    """Chained hash: a block's identity depends on every token before it."""
    return hash((parent_hash, tuple(token_ids), extra))


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block_hash -> block_id
        self.prefix_queries = 0            # blocks looked up
        self.prefix_hits = 0               # blocks found

    @property
    def num_free(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"need {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block_id)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference each. Pass tail blocks first: they are evicted first."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block_id} freed twice"
            if block.ref_cnt == 0:
                self._free[block_id] = None

    def lookup(self, block_hashes: Sequence[int]) -> list[int]:
        """Longest run of cached blocks for these chained hashes (not touched yet)."""
        if not self.enable_caching:
            return []
        hit = []
        for h in block_hashes:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        self.prefix_queries += len(block_hashes)
        self.prefix_hits += len(hit)
        return hit

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take a reference on cached blocks found by lookup (removing them from the free list)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Register a full block under its hash (first writer wins)."""
        if not self.enable_caching:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, block_id)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                block.block_hash = None
        self._cached = {h: b for h, b in self._cached.items() if self.blocks[b].block_hash == h}
