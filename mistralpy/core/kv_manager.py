"""Maps requests to KV blocks: allocation, prefix-cache hits and cache registration."""
from __future__ import annotations

from mistralpy.core.block_pool import BlockPool, hash_block
from mistralpy.core.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _update_hashes(self, req: Request, upto_tokens: int) -> None:
        """Extend req.block_hashes to cover every full block within the first upto_tokens tokens."""
        bs = self.block_size
        while (len(req.block_hashes) + 1) * bs <= upto_tokens:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if req.block_hashes else None
            tokens = [req.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            req.block_hashes.append(hash_block(parent, tokens, req.media_hashes_in(i * bs, (i + 1) * bs)))

    def get_computed_blocks(self, req: Request) -> int:
        """Attach cached prefix blocks to a new request; returns the number of tokens they cover.

        At least the last token is always recomputed, because its logits are needed.
        """
        if not self.enable_prefix_caching or req.block_ids:
            return 0
        self._update_hashes(req, req.num_tokens)
        max_blocks = (req.num_tokens - 1) // self.block_size
        hit = self.pool.lookup(req.block_hashes[:max_blocks])
        if hit:
            self.pool.touch(hit)
            req.block_ids = list(hit)
            req.num_committed_blocks = len(hit)
        return len(hit) * self.block_size

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        return need <= self.pool.num_free

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Ensure blocks for num_computed + num_new tokens. False (nothing changed) if the pool is short."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if need > self.pool.num_free:
            return False
        if need > 0:
            req.block_ids.extend(self.pool.allocate(need))
        return True

    def commit_computed(self, req: Request) -> None:
        """After a step: register every newly full block in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = req.num_computed_tokens // self.block_size
        if full <= req.num_committed_blocks:
            return
        self._update_hashes(req, full * self.block_size)
        for i in range(req.num_committed_blocks, full):
            self.pool.cache_block(req.block_ids[i], req.block_hashes[i])
        req.num_committed_blocks = full

    def free(self, req: Request) -> None:
        self.pool.free(list(reversed(req.block_ids)))
        req.block_ids = []
        req.num_committed_blocks = 0  # hashes depend only on tokens and stay valid
