"""The byte layout of ``aten._convert_weight_to_int4pack_for_cpu``, derived at run time.

torch's CPU int4 packing is ISA-specific and undocumented (torch 2.x, int4mm_kernel.cpp): AVX512
packs blocks of 64 rows, per column k 32 bytes holding rows (d, d + 32); AVX2 blocks of 32 rows,
per k 16 bytes holding rows (d, d + 16); the scalar build pairs rows (2d, 2d + 1). Rather than
assume one, ``layout_for(K')`` probes the op with nibble matrices spelling each value's row and
column in base 16 and reads back where every nibble went. It is used only when it is a
permutation of each 64-row block of bytes (the block the kernel pads to), the same for every
block, and random matrices round-trip.

Nibble stream of a block: its 32 K' bytes in memory order, each low nibble then high nibble.
``PackLayout.gather[n * K' + k]`` is the stream position of (n, k). Unpacking is a gather with it,
or, where the stream is ``[64 / R, K', R]`` (R rows per sub-block, k in the middle: every torch
build seen), a reshape, an interleave and a transpose, ~2x faster than the gather.

``mm_semantics_ok(group)`` checks what ``Int4PlaneKernel`` relies on: ``_weight_int4pack_mm_for_cpu(
x, packed, group, sz)`` = x @ W^T with ``W[n, k] = (q - 8) * sz[k // group, n, 0] + sz[k // group, n, 1]``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["BLOCK_ROWS", "PackLayout", "layout_for", "mm_semantics_ok", "pack"]

log = logging.getLogger(__name__)

BLOCK_ROWS = 64
_PROBE_ROWS = 3 * BLOCK_ROWS   # three blocks: the layout must repeat; row // 16 stays a nibble (< 16)


@dataclass(frozen=True, slots=True)
class PackLayout:
    """How the packed uint8 [rows, K'/2] of each 64-row block holds its nibbles [64, K']."""
    k_ext: int
    gather: torch.Tensor        # int64 [64 K']: stream position of (n, k) at n * K' + k
    sub_rows: int | None        # R when the stream is [64 / R, K', R], else None (gather only)
    interleaved: bool           # within R: nibble order of stack((lo, hi), -1), else cat((lo, hi))
    row_perm: torch.Tensor | None  # int64 [R]: row r of a sub-block = position row_perm[r]; None = identity

    def unpack(self, packed: torch.Tensor, *, use_gather: bool = False) -> torch.Tensor:
        """uint8 [rows, K'/2] (rows a multiple of 64) -> the nibbles uint8 [rows, K'] row-major."""
        rows, k = packed.shape[0], self.k_ext
        if self.sub_rows is None or use_gather:
            b = packed.reshape(rows // BLOCK_ROWS, -1)
            s = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(b.shape[0], -1)
            return torch.gather(s, 1, self.gather.expand(b.shape[0], -1)).reshape(rows, k)
        r = self.sub_rows
        b = packed.reshape(-1, k, r // 2)
        if self.interleaved:
            q = torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(-1, k, r)
        else:
            q = torch.cat((b & 0x0F, b >> 4), dim=2)
        q = q.transpose(1, 2)                              # [rows / R, R, K'] view
        if self.row_perm is not None:
            return q.index_select(1, self.row_perm).reshape(rows, k)
        return q.reshape(rows, k)                          # the one copy


def pack(nib: torch.Tensor) -> torch.Tensor:
    """nibbles [N, K'] (any int dtype, 0..15) -> torch's packed uint8 [N, K'/2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nib.to(torch.int32).contiguous(), 2)


def _stream(packed: torch.Tensor, blocks: int) -> torch.Tensor:
    """Packed bytes -> int64 [blocks, 64 K'] nibble streams (low then high nibble of each byte)."""
    b = packed.reshape(blocks, -1).to(torch.int64)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(blocks, -1)


def _sub_block(n: torch.Tensor, k: torch.Tensor, k_ext: int) -> tuple[int, torch.Tensor] | None:
    """(R, rows of the R nibbles of each group) when block 0's stream is [64 / R, K', R]."""
    i = torch.arange(n.numel())
    for r in (64, 32, 16, 8, 4, 2):
        if not (torch.equal(k, (i // r) % k_ext) and torch.equal(n // r, i // (k_ext * r))):
            continue
        pos = (n % r).reshape(-1, r)
        if torch.equal(pos, pos[:1].expand_as(pos)):
            return r, pos[0]
    return None


def _derive(k_ext: int) -> PackLayout | None:
    rows = _PROBE_ROWS
    n = torch.arange(rows, dtype=torch.int32).unsqueeze(1).expand(rows, k_ext)
    k = torch.arange(k_ext, dtype=torch.int32).unsqueeze(0).expand(rows, k_ext)
    packed = pack(n % 16)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, k_ext // 2):
        return None   # slicing rows of packed would not select blocks
    blocks = rows // BLOCK_ROWS
    got_n = _stream(packed, blocks) + 16 * _stream(pack(n // 16), blocks)
    got_k = torch.zeros_like(got_n)
    for d in range(max(1, math.ceil(math.log(k_ext, 16)))):
        got_k += _stream(pack((k >> (4 * d)) % 16), blocks) << (4 * d)
    block = torch.arange(blocks).unsqueeze(1)
    if not torch.equal(got_n // BLOCK_ROWS, block.expand_as(got_n)):
        return None   # a block's bytes hold rows of another block
    local = got_n - block * BLOCK_ROWS
    if not (torch.equal(local, local[:1].expand_as(local)) and torch.equal(got_k, got_k[:1].expand_as(got_k))):
        return None   # the layout differs between blocks
    flat = local[0] * k_ext + got_k[0]
    if not torch.equal(torch.sort(flat).values, torch.arange(flat.numel())):
        return None   # not a permutation
    gather = torch.empty_like(flat)
    gather[flat] = torch.arange(flat.numel())
    sub = _sub_block(local[0], got_k[0], k_ext)
    layout = PackLayout(k_ext, gather, None, False, None)
    if sub is not None:
        r, pos = sub   # pos[j]: row of stream nibble j; j = 2 byte + (high nibble)
        cat_rows = torch.cat((pos[0::2], pos[1::2]))   # rows in cat((lo, hi)) order
        ident = torch.arange(r)
        if torch.equal(cat_rows, ident):
            layout = PackLayout(k_ext, gather, r, False, None)
        elif torch.equal(pos, ident):
            layout = PackLayout(k_ext, gather, r, True, None)
        else:
            layout = PackLayout(k_ext, gather, r, False, torch.argsort(cat_rows))
    rand = torch.randint(0, 16, (rows, k_ext), dtype=torch.uint8, generator=torch.Generator().manual_seed(k_ext))
    p = pack(rand)
    if not (torch.equal(layout.unpack(p), rand) and torch.equal(layout.unpack(p, use_gather=True), rand)):
        return None
    return layout


@lru_cache(maxsize=None)
def layout_for(k_ext: int) -> PackLayout | None:
    """The derived layout for rows of K' = `k_ext` nibbles, or None where the op is missing, rejects
    the shape, or packs in some way other than one permutation per 64-row block."""
    try:
        layout = _derive(int(k_ext))
    except (AttributeError, RuntimeError) as exc:
        log.info("int4 pack layout for K'=%d not derivable: %s", k_ext, exc)
        return None
    if layout is None:
        log.info("int4 pack layout for K'=%d is not a per-64-row-block permutation", k_ext)
    return layout


@lru_cache(maxsize=None)
def mm_semantics_ok(group: int) -> bool:
    """Does the bf16 int4 mm compute x @ ((q - 8) * scale + zero)^T per group? (bf16 tolerance)"""
    try:
        gen = torch.Generator().manual_seed(group)
        n, k = 2 * BLOCK_ROWS, 4 * group
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
        scale = (torch.rand(n, k // group, generator=gen) + 0.5) * 0.01
        zero = torch.randn(n, k // group, generator=gen) * 0.05
        sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().bfloat16()   # [K/g, N, 2]
        s, z = sz[..., 0].float().t(), sz[..., 1].float().t()                              # [N, K/g]
        w = ((q.float() - 8).reshape(n, -1, group) * s.unsqueeze(-1) + z.unsqueeze(-1)).reshape(n, k)
        packed = pack(q)
        for m in (1, 5):
            x = torch.randn(m, k, generator=gen).bfloat16()
            ref = x.float() @ w.t()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz).float()
            if tuple(y.shape) != (m, n) or ((y - ref).abs().max() / ref.abs().max()).item() > 1e-2:
                log.info("int4 mm (group %d) does not compute (q - 8) * scale + zero", group)
                return False
    except (AttributeError, RuntimeError) as exc:
        log.info("int4 mm (group %d) unusable: %s", group, exc)
        return False
    return True
