"""Bidirectional attention over whole sequences, with no KV cache: the encoder models' backend.

An embedding request runs its whole sequence in one step and keeps nothing after it, so keys and
values need no paged cache. The flat batch [T] is gathered into a padded [B, L] batch once per step
(``build_metadata``); every layer then runs one scaled_dot_product_attention over it with a key
padding mask (plus, optionally, an additive bias such as MPNet's relative positions, and a
two-sided window for EmbeddingGemma's local layers) and scatters the rows back.

``reference_attention`` is the plain per-sequence softmax(q k^T) v the fast path is tested against.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mistralpy.attention.backend import AttentionSpec
from mistralpy.worker.forward_batch import ForwardBatch


@dataclass(slots=True)
class BidirectionalMetadata:
    seq_lens: list[int]            # tokens of each sequence (the whole sequence is in the step)
    query_start_loc: list[int]
    max_len: int
    gather: torch.Tensor | None    # [B * L] flat row of each padded slot (pads read row 0); None: B == 1
    scatter: torch.Tensor | None   # [T] padded slot of each flat row
    key_valid: torch.Tensor        # [B, 1, 1, L] bool: a real key
    positions: torch.Tensor        # [L] 0..L-1 (relative-position biases are built from it)


class BidirectionalBackend:
    name = "bidirectional"

    def build_metadata(self, batch: ForwardBatch) -> BidirectionalMetadata:
        lens = list(batch.query_lens)
        if any(s != q for s, q in zip(batch.seq_lens, batch.query_lens)):
            raise RuntimeError("bidirectional attention needs each sequence whole in one step")
        dev = batch.input_ids.device
        b, longest = len(lens), max(lens)
        starts = batch.query_start_loc
        ar = torch.arange(longest, device=dev)
        lens_t = torch.tensor(lens, device=dev)
        valid = ar[None, :] < lens_t[:, None]                                     # [B, L]
        gather = scatter = None
        if b > 1:
            start_t = torch.tensor(starts[:-1], device=dev)
            gather = torch.where(valid, start_t[:, None] + ar[None, :], 0).flatten()
            scatter = (torch.arange(b, device=dev)[:, None] * longest + ar[None, :])[valid]
        return BidirectionalMetadata(lens, list(starts), longest, gather, scatter,
                                     valid[:, None, None, :], ar)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None, md: BidirectionalMetadata, spec: AttentionSpec,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hk, D] -> [T, Hq, D]; the caches are ignored (there are none).
        ``bias``: an additive [Hq, L, L] float term (the same for every sequence)."""
        if spec.logit_softcap is not None or spec.attention_chunk_size is not None:
            raise NotImplementedError("bidirectional attention: no soft-capping or chunked attention")
        b, longest = len(md.seq_lens), md.max_len
        hq, hk = q.shape[1], k.shape[1]

        def padded(x: torch.Tensor) -> torch.Tensor:   # [T, H, D] -> [B, H, L, D]
            if md.gather is not None:
                x = x.index_select(0, md.gather)
            return x.view(b, longest, x.shape[1], x.shape[2]).transpose(1, 2)

        qp, kp, vp = padded(q), padded(k), padded(v)
        if hk != hq:  # grouped-query heads: each kv head serves hq // hk query heads
            kp = kp.repeat_interleave(hq // hk, dim=1)
            vp = vp.repeat_interleave(hq // hk, dim=1)
        mask = md.key_valid if b > 1 else None
        if spec.sliding_window is not None:    # |i - j| < window, both ways
            p = md.positions
            near = (p[:, None] - p[None, :]).abs() < spec.sliding_window
            mask = near if mask is None else mask & near
        if bias is not None:
            add = bias.to(qp.dtype).unsqueeze(0)
            mask = add if mask is None else add.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=spec.scale)
        out = out.transpose(1, 2).reshape(b * longest, hq, out.shape[-1])
        return out if md.scatter is None else out.index_select(0, md.scatter)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_start_loc: list[int],
                        spec: AttentionSpec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The plain-PyTorch form: each sequence alone, softmax(q k^T * scale + bias) v in float32."""
    outs = []
    hq, hk = q.shape[1], k.shape[1]
    for lo, hi in itertools.pairwise(query_start_loc):
        qs, ks, vs = (x[lo:hi].float().transpose(0, 1) for x in (q, k, v))     # [H, n, D]
        ks, vs = ks.repeat_interleave(hq // hk, 0), vs.repeat_interleave(hq // hk, 0)
        scores = qs @ ks.transpose(1, 2) * spec.scale
        n = hi - lo
        if bias is not None:
            scores = scores + bias[:, :n, :n].float()
        if spec.sliding_window is not None:
            p = torch.arange(n)
            scores = scores.masked_fill((p[:, None] - p[None, :]).abs() >= spec.sliding_window, float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype))
    return torch.cat(outs)
