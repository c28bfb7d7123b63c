"""Reference attention over the paged KV cache: gather each sequence's blocks, then SDPA.

Runs on any device and is the oracle for fast backends. Decode rows (one new token) are
batched into a single SDPA call over a padded gather; rows with several new tokens (prefill
chunks) go one sequence at a time with an explicit causal / sliding-window / chunked mask. On CPU,
when the C++ extension is loaded, decode rows instead go through ``cpu_paged.decode`` (one call per
layer that writes the cache and attends in place, no gather); ``MISTRALPY_CPU_EXT=0`` keeps torch's
path. Chunked-attention layers (``spec.attention_chunk_size``) give the op each row's own chunk
(block table from the chunk's first block, length within it) when chunks are whole blocks, else
take torch's path: the op has one window a call, a chunk's visible span differs per decode row.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mistralpy.attention import cpu_paged
from mistralpy.attention.backend import AttentionSpec
from mistralpy.worker.forward_batch import ForwardBatch


@dataclass(slots=True)
class _PrefillSeq:
    q_start: int
    q_end: int
    seq_len: int
    blocks: torch.Tensor  # block ids covering seq_len


@dataclass(slots=True)
class TorchRefMetadata:
    slot_mapping: torch.Tensor
    block_size: int
    # batched decode rows
    decode_rows: torch.Tensor | None = None       # [Bd] token row of each decode sequence
    decode_blocks: torch.Tensor | None = None     # [Bd, nb] block tables
    decode_lens: torch.Tensor | None = None       # [Bd]
    decode_max_len: int = 0
    all_decode: bool = False
    prefill: list[_PrefillSeq] = field(default_factory=list)
    _masks: dict = field(default_factory=dict)    # cached per (kind, window) masks


class TorchRefBackend:
    name = "torch_ref"

    def build_metadata(self, batch: ForwardBatch) -> TorchRefMetadata:
        md = TorchRefMetadata(slot_mapping=batch.slot_mapping, block_size=batch.block_size)
        bs = batch.block_size
        dev = batch.block_tables.device
        decode_idx = [i for i, q in enumerate(batch.query_lens) if q == 1]
        if decode_idx:
            max_len = max(batch.seq_lens[i] for i in decode_idx)
            nb = -(-max_len // bs)
            idx = torch.tensor(decode_idx, device=dev)
            md.decode_rows = torch.tensor([batch.query_start_loc[i] for i in decode_idx], device=dev)
            md.decode_blocks = batch.block_tables.index_select(0, idx)[:, :nb].long()
            md.decode_lens = torch.tensor([batch.seq_lens[i] for i in decode_idx], device=dev)
            md.decode_max_len = max_len
            md.all_decode = len(decode_idx) == batch.num_seqs
            if dev.type == "cpu":  # load (or build) the C++ op here, eagerly: compiled steps only read the flag
                cpu_paged.available()
        for i, q in enumerate(batch.query_lens):
            if q == 1:
                continue
            seq_len = batch.seq_lens[i]
            nb = -(-seq_len // bs)
            md.prefill.append(_PrefillSeq(batch.query_start_loc[i], batch.query_start_loc[i + 1], seq_len,
                                          batch.block_tables[i, :nb].long()))
        return md

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, md: TorchRefMetadata, spec: AttentionSpec) -> torch.Tensor:
        # The C++ op (cpu_paged) for decode rows where it applies; it writes the cache itself.
        fast = md.decode_rows is not None and cpu_paged.usable(q, k, v, k_cache, v_cache)
        chunked = spec.attention_chunk_size is not None
        if torch.compiler.is_compiling():  # worker/compile.py compiles decode-only steps
            if fast and not chunked:
                return cpu_paged.decode(q, k, v, k_cache, v_cache, md.slot_mapping, md.decode_blocks,
                                        md.decode_lens, spec)
            return _traced_decode(q, k, v, k_cache, v_cache, md, spec)
        blocks, lens, op_spec = md.decode_blocks, md.decode_lens, spec
        if fast and chunked:   # the op over each row's own chunk, when chunks start on block boundaries
            view = _chunk_rows(md, spec)
            fast = view is not None
            if view is not None:
                blocks, lens, op_spec = view
        if fast and md.all_decode:  # decode row i is token row i
            return cpu_paged.decode(q, k, v, k_cache, v_cache, md.slot_mapping, blocks, lens, op_spec)
        # v may be narrower than k and its cache a view into k's (MLA's latent cache, model_runner)
        num_kv_heads, head_dim, v_dim = k_cache.shape[2], k_cache.shape[3], v_cache.shape[3]
        flat_k = k_cache.view(-1, num_kv_heads, head_dim)
        flat_v = v_cache.view(-1, num_kv_heads, v_dim)
        flat_k.index_copy_(0, md.slot_mapping, k.to(k_cache.dtype))
        flat_v.index_copy_(0, md.slot_mapping, v.to(v_cache.dtype))

        if md.all_decode:
            return self._decode(q, k_cache, v_cache, md, spec)
        out = q.new_empty(q.shape[0], q.shape[1], v_dim)
        if md.decode_rows is not None:
            dq = q.index_select(0, md.decode_rows)
            if fast:  # every row is written above: the op only attends (no rows to write)
                dec = cpu_paged.decode(dq, k[:0], v[:0], k_cache, v_cache, md.slot_mapping[:0], blocks, lens,
                                       op_spec)
            else:
                dec = self._decode(dq, k_cache, v_cache, md, spec)
            out.index_copy_(0, md.decode_rows, dec)
        for seq in md.prefill:
            keys = k_cache.index_select(0, seq.blocks).view(-1, num_kv_heads, head_dim)[: seq.seq_len]
            vals = v_cache.index_select(0, seq.blocks).view(-1, num_kv_heads, v_dim)[: seq.seq_len]
            q_len = seq.q_end - seq.q_start
            mask = None
            if (q_len != seq.seq_len or spec.sliding_window is not None or spec.logit_softcap is not None
                    or spec.attention_chunk_size is not None):
                mask = _prefill_mask(q_len, seq.seq_len, spec.sliding_window, q.device, spec.attention_chunk_size)
            out[seq.q_start:seq.q_end] = _sdpa(q[seq.q_start:seq.q_end].transpose(0, 1).unsqueeze(0),
                                               keys.transpose(0, 1).unsqueeze(0),
                                               vals.transpose(0, 1).unsqueeze(0),
                                               mask, spec)[0].transpose(0, 1)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: TorchRefMetadata,
                spec: AttentionSpec) -> torch.Tensor:
        bd, nb = md.decode_blocks.shape
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        flat_blocks = md.decode_blocks.reshape(-1)  # index_select is several times faster than advanced indexing
        keys = k_cache.index_select(0, flat_blocks).view(bd, nb * md.block_size, num_kv_heads, head_dim)
        vals = v_cache.index_select(0, flat_blocks).view(bd, nb * md.block_size, num_kv_heads, v_cache.shape[3])
        key = ("decode", spec.sliding_window, spec.attention_chunk_size)
        mask = md._masks.get(key)
        if mask is None:
            pos = torch.arange(nb * md.block_size, device=q.device)
            mask = _decode_valid(pos, md.decode_lens.unsqueeze(1), spec)[:, None, None, :]
            md._masks[key] = mask
        q4, k4, v4 = q.unsqueeze(2), keys.transpose(1, 2), vals.transpose(1, 2)
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and spec.logit_softcap is None:
            return _cpu_low_precision_decode(q4, k4, v4, mask, spec).squeeze(2)
        return _sdpa(q4, k4, v4, mask, spec).squeeze(2)


def _cpu_low_precision_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                              spec: AttentionSpec) -> torch.Tensor:
    """One-query attention for bf16/f16 on CPU, where SDPA's kernel is slow (194 us for one 9-head
    row of 300 keys on a Zen 4, 2.7 ms for 16 rows). A few rows: SDPA in float32 (54 us). More
    rows: grouped-query matmuls in the cache dtype with a float32 softmax (440 us for 16 rows).
    q [B, Hq, 1, D], k [B, Hk, L, D], v [B, Hk, L, Dv], mask [B, 1, 1, L] -> [B, Hq, 1, Dv]."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    if b <= 4:
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=spec.scale,
                                             enable_gqa=hk != hq)
        return out.to(q.dtype)
    scores = torch.matmul(q.view(b, hk, hq // hk, d), k.transpose(-1, -2)).float() * spec.scale
    probs = torch.softmax(scores.masked_fill_(~mask, -math.inf), dim=-1).to(q.dtype)
    return torch.matmul(probs, v).view(b, hq, 1, v.shape[-1])


def _traced_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, md: TorchRefMetadata, spec: AttentionSpec) -> torch.Tensor:
    """Decode rows written for inductor (worker/compile.py): the cache write, block gather, scores,
    softmax and weighted sum as gathers, products and reductions that it fuses into a few C++ loops
    (the eager form of these ops would materialise [B, Hk, G, L, D] products). float32 math, as
    `_cpu_low_precision_decode`. q [B, Hq, D], k [B, Hk, D], v [B, Hk, Dv] -> [B, Hq, Dv]."""
    b, hq, d = q.shape
    hk, dv = k_cache.shape[2], v_cache.shape[3]
    k_cache.view(-1, hk, d).index_copy_(0, md.slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hk, dv).index_copy_(0, md.slot_mapping, v.to(v_cache.dtype))
    blocks = md.decode_blocks
    length = blocks.shape[1] * k_cache.shape[1]
    keys = k_cache[blocks].view(b, length, hk, d).permute(0, 2, 1, 3).unsqueeze(2)   # [B, Hk, 1, L, D]
    vals = v_cache[blocks].reshape(b, length, hk, dv).permute(0, 2, 1, 3).unsqueeze(2)
    qf = q.view(b, hk, hq // hk, 1, d).float()
    scores = (qf * keys.float()).sum(-1) * spec.scale                                 # [B, Hk, G, L]
    if spec.logit_softcap is not None:
        scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
    valid = _decode_valid(torch.arange(length, device=q.device), md.decode_lens.unsqueeze(1), spec)
    scores = scores.masked_fill(~valid[:, None, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    out = (probs.unsqueeze(-1) * vals.float()).sum(-2)                                 # [B, Hk, G, Dv]
    return out.reshape(b, hq, dv).to(q.dtype)


def _chunk_rows(md: TorchRefMetadata, spec: AttentionSpec
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionSpec] | None:
    """Chunked decode rows as plain rows over their own chunk, for the C++ op (one window a call):
    when a chunk is whole blocks, row b's table starts at its chunk's first block and its length
    counts from there. (block tables [Bd, nb], lengths [Bd], the spec without the chunk), cached per
    step; None when chunks do not start on block boundaries."""
    chunk = spec.attention_chunk_size
    if chunk is None or chunk % md.block_size:
        return None
    key = ("chunk_rows", spec)
    hit = md._masks.get(key)
    if hit is None:
        first = (md.decode_lens - 1) // chunk * (chunk // md.block_size)          # [Bd] first block
        nb = md.decode_blocks.shape[1]
        cols = (first[:, None] + torch.arange(nb, device=first.device)).clamp_(max=nb - 1)   # padding: valid ids
        blocks = md.decode_blocks.gather(1, cols)
        hit = md._masks[key] = (blocks, md.decode_lens - first * md.block_size,
                                dataclasses.replace(spec, attention_chunk_size=None))
    return hit


def _decode_valid(pos: torch.Tensor, lens: torch.Tensor, spec: AttentionSpec) -> torch.Tensor:
    """Keys each decode row sees: pos [L], lens [B, 1] (the query sits at lens - 1) -> bool [B, L]."""
    valid = pos.unsqueeze(0) < lens
    if spec.sliding_window is not None:
        valid = valid & (pos.unsqueeze(0) > lens - 1 - spec.sliding_window)
    if spec.attention_chunk_size is not None:
        chunk = spec.attention_chunk_size
        valid = valid & (pos.unsqueeze(0) >= (lens - 1) // chunk * chunk)
    return valid


def _prefill_mask(q_len: int, seq_len: int, window: int | None, device: torch.device,
                  chunk: int | None = None) -> torch.Tensor:
    q_pos = torch.arange(seq_len - q_len, seq_len, device=device).unsqueeze(1)
    k_pos = torch.arange(seq_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    if chunk is not None:   # Llama 4: keys of the query's own chunk only
        mask &= k_pos >= q_pos // chunk * chunk
    return mask


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          spec: AttentionSpec) -> torch.Tensor:
    """q [B, Hq, Lq, D], k/v [B, Hk, Lk, D]; mask bool broadcastable to [B, Hq, Lq, Lk] or None (causal)."""
    gqa = k.shape[1] != q.shape[1]
    if spec.logit_softcap is not None:
        if gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * spec.scale
        scores = torch.tanh(scores / spec.logit_softcap) * spec.logit_softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    # enable_gqa lets SDPA share each K/V head across its query group without copying K/V.
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)
