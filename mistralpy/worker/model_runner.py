"""Model runner: owns the model, the paged KV cache and the sampler; runs one scheduled step."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from mistralpy.attention.backend import get_backend
from mistralpy.config import CacheConfig, EngineConfig
from mistralpy.core.scheduler import SchedulerOutput
from mistralpy.embed import runner as embed_runner
from mistralpy.loading.model_loader import load_model
from mistralpy.sample.sampler import Sampler, SamplerOutput, SamplingRow
from mistralpy.worker.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

_CPU_DEFAULT_KV_GB = 2.0


class CrossMedia(NamedTuple):
    """One media item whose rows a sequence's cross-attention layers attend to in a step."""

    rows: torch.Tensor     # model.embed_multimodal(item), from the encoder cache
    start: int             # first position that sees the item
    end: int | None        # first position that no longer does; None: the rest of the sequence


@dataclass(slots=True)
class CrossBatch:
    """``cross_media`` of a cross-attention model's forward (``model.cross_attention = True``): per
    scheduled sequence (batch order) the items visible to some row of its chunk, and the sequences'
    row offsets in the flat batch (ForwardBatch.query_start_loc)."""

    media: list[list[CrossMedia]]
    query_start_loc: list[int]


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, v_head_dim: int | None = None, v_in_k: bool = False) -> int:
    """Bytes of one block over all layers; v_head_dim defaults to head_dim, v_in_k (the v cache is a
    view into the k cache, as MLA's latent) counts v as free."""
    v_dim = 0 if v_in_k else (head_dim if v_head_dim is None else v_head_dim)
    per_token = num_kv_heads * (head_dim + v_dim)
    return num_layers * block_size * per_token * torch.empty((), dtype=dtype).element_size()


def decide_num_blocks(cache: CacheConfig, per_block: int, device: torch.device, max_model_len: int,
                      max_seqs: int) -> int:
    """Explicit num_blocks > kv_cache_memory_gb > a default that fits max_seqs full contexts within limits."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_memory_gb is not None:
        budget = int(cache.kv_cache_memory_gb * (1 << 30))
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.85)
    else:
        budget = min(int(_CPU_DEFAULT_KV_GB * (1 << 30)), _available_memory_bytes() // 4)
    want = -(-max_model_len // cache.block_size) * max_seqs
    return max(1, min(want, budget // per_block))


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.device
        self.block_size = config.cache.block_size
        if self.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, os.cpu_count() or 1))
        self.backend = get_backend(self.device)
        self.model = load_model(config.model, self.device, self.backend)
        m = self.model
        # an encoder (mistralpy/embed) attends over each whole sequence through its own cache-free
        # backend: no KV pool (one nominal block), no sampler rows, no native decode
        self.encoder_only = bool(getattr(m, "encoder_only", False))
        if self.encoder_only:
            self.backend = m.backend
        v_dim, v_in_k = getattr(m, "v_cache_dim", None) or m.head_dim, getattr(m, "v_in_k", False)
        per_block = kv_bytes_per_block(m.num_layers, self.block_size, m.num_kv_heads, m.head_dim,
                                       config.model.dtype, v_dim, v_in_k)
        self.num_blocks = 1 if self.encoder_only else decide_num_blocks(
            config.cache, per_block, self.device, config.model.max_model_len, config.scheduler.max_seqs)
        # Allocated uninitialised (no start-up memset, no resident memory until used) and zeroed
        # up to the highest block id in use, on first use: attention reads padded and not yet
        # written slots under a mask, and 0 * NaN garbage would still poison the output.
        self.kv_caches = [] if self.encoder_only else [
            self._layer_cache(m.num_kv_heads, m.head_dim, v_dim, v_in_k, config.model.dtype) for _ in range(m.num_layers)]
        self._zeroed_blocks = 0
        log.info("KV cache: %d blocks x %d tokens (%.1f MiB)", self.num_blocks, self.block_size,
                 self.num_blocks * per_block / 2**20)
        self.sampler = Sampler(config.model.vocab_size, seed=config.seed)
        self.encoder_cache = None  # media models: encoder outputs kept across chunks and requests
        if hasattr(self.model, "embed_multimodal"):
            from mistralpy.multimodal.encoder_cache import EncoderCache

            self.encoder_cache = EncoderCache(max(16384, 4 * config.scheduler.max_num_batched_tokens))
        # Qwen-VL's M-RoPE: (t, h, w) positions per token beside the sequence index (Request.rope_positions)
        self.uses_mrope = bool(getattr(self.model, "uses_mrope", False))
        # Mllama-style models: media are attended to by cross-attention layers on every step (decode
        # included), not scattered into the input embeddings (see _cross_media)
        self.cross_attention = bool(getattr(self.model, "cross_attention", False))
        self.compiled = None
        self.native = None  # worker/native_decode.py: all-decode CPU steps in one C++ call
        if self.device.type == "cpu" and os.environ.get("MISTRALPY_NATIVE_DECODE", "1") != "0" and not self.encoder_only:
            from mistralpy.worker.native_decode import NativeDecode

            self.native = NativeDecode.install(self.model)

    def _layer_cache(self, heads: int, k_dim: int, v_dim: int, v_in_k: bool,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(k [blocks, bs, heads, k_dim], v [blocks, bs, heads, v_dim]); with v_in_k, v is a view
        of k's first v_dim channels (the backend's write of v then lands on the same memory)."""
        k = torch.empty((self.num_blocks, self.block_size, heads, k_dim), dtype=dtype, device=self.device)
        if v_in_k:
            return k, k[..., :v_dim]
        return k, torch.empty((self.num_blocks, self.block_size, heads, v_dim), dtype=dtype, device=self.device)

    def enable_compile(self) -> bool:
        """Run decode-only steps through torch.compile'd decoder layers (worker/compile.py), unless the
        native C++ decode loop serves this model: it is faster than the compiled layers (SmolLM2-135M
        Q4_1, 2 threads: 235 against 153 tok/s) and needs no compiling. Returns whether it compiled."""
        if self.encoder_only:   # whole-sequence steps only: nothing to compile
            return False
        if self.native is not None:
            log.info("--compile: the native decode loop already runs this model's decode steps; not compiling")
            return False
        if self.uses_mrope or self.cross_attention:   # compiled decode serves model.model.decode_layers only
            log.info("--compile: %s (%s) runs eagerly", type(self.model).__name__,
                     "M-RoPE" if self.uses_mrope else "cross-attention")
            return False
        from mistralpy.worker.compile import CompiledDecode

        # the longest sequence that can run: the context length, capped by the KV pool
        longest = min(self.config.model.max_model_len, self.num_blocks * self.config.cache.block_size)
        self.compiled = CompiledDecode(self.model, longest)
        return True

    def build_batch(self, sched: SchedulerOutput) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens, query_lens, starts, logits_rows = [], [], [0], []
        bs = self.block_size
        for s in sched.seqs:
            req, start = s.req, s.req.num_computed_tokens
            end = start + s.num_new_tokens
            prompt_len = len(req.prompt_token_ids)
            if start >= prompt_len:
                input_ids.extend(req.output_token_ids[start - prompt_len:end - prompt_len])
            else:
                input_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            blocks = req.block_ids   # none: an encoder's request (its backend ignores slots)
            slots.extend(blocks[p // bs] * bs + p % bs if blocks else -1 for p in range(start, end))
            seq_lens.append(end)
            query_lens.append(s.num_new_tokens)
            starts.append(starts[-1] + s.num_new_tokens)
            if s.samples and req.pooling is None:
                logits_rows.append(starts[-1] - 1)
        self._zero_new_blocks(max(max(s.req.block_ids, default=-1) for s in sched.seqs) + 1)
        max_blocks = max(len(s.req.block_ids) for s in sched.seqs)
        table = [s.req.block_ids + [0] * (max_blocks - len(s.req.block_ids)) for s in sched.seqs]
        dev = self.device
        mrope = None
        if self.uses_mrope:
            mrope = torch.cat([s.req.rope_positions(s.req.num_computed_tokens, s.req.num_computed_tokens
                                                    + s.num_new_tokens) for s in sched.seqs], dim=1).to(dev)
        return ForwardBatch(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=dev),
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(table, dtype=torch.int32, device=dev),
            seq_lens=seq_lens, query_lens=query_lens, query_start_loc=starts,
            logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=dev),
            block_size=bs, mrope_positions=mrope,
        )

    def _zero_new_blocks(self, high: int) -> None:
        """Zero blocks [zeroed, high) before they are first read (padding uses block 0 too)."""
        if high <= self._zeroed_blocks:
            return
        for k_cache, v_cache in self.kv_caches:
            k_cache[self._zeroed_blocks:high].zero_()
            v_cache[self._zeroed_blocks:high].zero_()
        self._zeroed_blocks = high

    @torch.inference_mode()
    def compute_logits(self, sched: SchedulerOutput) -> torch.Tensor | None:
        """Run the model on the step's flat batch; logits [N, V] for the sampling rows only (None:
        none). Embedding / scoring requests get their pooled results (``req.pooling.result``)."""
        batch = self.build_batch(sched)
        metadata = self.backend.build_metadata(batch)
        kwargs: dict[str, Any] = {} if batch.mrope_positions is None else {"mrope_positions": batch.mrope_positions}
        pooling = any(s.req.pooling is not None for s in sched.seqs)
        if pooling and self.encoder_only:
            kwargs.update(embed_runner.pooling_kwargs(self.model, sched, batch))
        if self.cross_attention:
            kwargs["cross_media"] = self._cross_media(sched, batch)
        elif self.encoder_cache is not None:
            embeds = self._media_embeds(sched, batch)
            if embeds is not None:
                kwargs["inputs_embeds"] = embeds
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, metadata, **kwargs)
        if pooling:
            embed_runner.pool_step(self.model, sched, batch, hidden)
        if batch.logits_indices.numel() == 0:
            return None
        return self.model.compute_logits(hidden.index_select(0, batch.logits_indices))

    def _media_embeds(self, sched: SchedulerOutput, batch: ForwardBatch) -> torch.Tensor | None:
        """Input embeddings with the encoder rows of every media item this step's chunks touch
        scattered at their placeholder positions; None when no chunk touches one (the usual path)."""
        rows: list[int] = []
        parts: list[torch.Tensor] = []
        for s, base in zip(sched.seqs, batch.query_start_loc):
            req = s.req
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            for item in req.mm_items:
                r = item.placeholder
                if r.offset >= end or r.offset + r.length <= start:
                    continue
                enc = self._encoded(item, req.request_id)
                pos = torch.tensor(r.embed_positions())
                take = ((pos >= start) & (pos < end)).nonzero().flatten()
                rows.extend((pos[take] - start + base).tolist())
                parts.append(enc.index_select(0, take.to(enc.device)))
        if not rows:
            return None
        embeds = self.model.embed_input_ids(batch.input_ids)
        idx = torch.tensor(rows, dtype=torch.long, device=embeds.device)
        embeds[idx] = torch.cat(parts).to(embeds.dtype)
        return embeds

    def _encoded(self, item: Any, request_id: str) -> torch.Tensor:
        """The item's encoder rows from the cache, else computed and cached; either way referenced
        by ``request_id`` until the scheduler releases the request (finish, abort, preemption), so
        the cache never evicts them while it runs."""
        enc = self.encoder_cache.get(item.hash, request_id)
        if enc is None:
            enc = self.model.embed_multimodal(item)
            if enc.shape[0] != item.num_embeds:
                raise RuntimeError(f"encoder gave {enc.shape[0]} rows for an item of {item.num_embeds}")
            self.encoder_cache.put(item.hash, enc, request_id)
        return enc

    def _cross_media(self, sched: SchedulerOutput, batch: ForwardBatch) -> CrossBatch:
        """Each sequence's items visible to some position of its chunk: ``item.extra["cross_span"]``
        = (start, end or None), default (placeholder offset, None). An item is encoded on the first
        step that needs it (a prefix-cache hit or a preemption may skip its placeholder's chunk)."""
        media: list[list[CrossMedia]] = []
        for s in sched.seqs:
            req = s.req
            start, end = req.num_computed_tokens, req.num_computed_tokens + s.num_new_tokens
            seen = []
            for item in req.mm_items:
                lo, hi = item.extra.get("cross_span", (item.placeholder.offset, None))
                if lo < end and (hi is None or hi > start):
                    seen.append(CrossMedia(self._encoded(item, req.request_id), lo, hi))
            media.append(seen)
        return CrossBatch(media, batch.query_start_loc)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> SamplerOutput | None:
        """Forward + sample. Returns one token per scheduled seq with ``samples`` set (in order)."""
        logits = self.compute_logits(sched)
        rows = [SamplingRow(params=s.req.params, prompt_token_ids=s.req.prompt_token_ids,
                            output_token_ids=s.req.output_token_ids, generator=s.req.generator,
                            eos_token_ids=s.req.eos_token_ids, dry_breaker_ids=s.req.dry_breaker_ids,
                            grammar=s.req.grammar)
                for s in sched.seqs if s.samples and s.req.pooling is None]
        if not rows:
            return None
        return self.sampler(logits, rows)
