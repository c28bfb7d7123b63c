"""GGUF (ggml) block formats and their dequantization, in vectorized PyTorch.

Every quantized ggml type stores a row as consecutive blocks of `type_size` bytes, each holding
`block_size` values. `dequantize` turns the raw bytes of a tensor into float32, bit-exact with
`gguf.quants.dequantize` (the same float operations in the same order: no fused multiply-add, the
f16 scales widened to f32 first). This is the readable reference that fast quantized matmuls are
tested against; it runs on any device the input lives on.

Layouts follow ggml-common.h (QK_K = 256 for the K- and IQ4_XS super-blocks). Q8_K (ggml's
activation format, an ISQ type of mistral.rs) is not in `gguf.quants`; its dequantization is
ggml's `dequantize_row_q8_K`, ``d * q`` in float32, exact by construction (tests/test_gguf_dequant.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from gguf import GGMLQuantizationType as Q

__all__ = ["QK_K", "BLOCK_SIZES", "SUPPORTED_TYPES", "block_size", "type_size", "nbytes", "dequantize",
           "IQ4NL_VALUES"]

QK_K = 256

# qtype -> (values per block, bytes per block): the one table of block geometry.
BLOCK_SIZES: dict[Q, tuple[int, int]] = {
    Q.F32: (1, 4),
    Q.F16: (1, 2),
    Q.BF16: (1, 2),
    Q.Q4_0: (32, 2 + 16),
    Q.Q4_1: (32, 2 + 2 + 16),
    Q.Q5_0: (32, 2 + 4 + 16),
    Q.Q5_1: (32, 2 + 2 + 4 + 16),
    Q.Q8_0: (32, 2 + 32),
    Q.Q2_K: (QK_K, QK_K // 16 + QK_K // 4 + 2 + 2),
    Q.Q3_K: (QK_K, QK_K // 8 + QK_K // 4 + 12 + 2),
    Q.Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),
    Q.Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),
    Q.Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),
    Q.IQ4_NL: (32, 2 + 16),
    Q.IQ4_XS: (QK_K, 2 + 2 + QK_K // 64 + QK_K // 2),
    Q.Q8_K: (QK_K, 4 + QK_K + QK_K // 8),   # f32 d, 256 int8, 16 int16 block sums
}

# The non-linear 4-bit codebook of IQ4_NL / IQ4_XS (kvalues_iq4nl in ggml).
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def block_size(qtype: Q) -> int:
    """Values per block of `qtype`."""
    return BLOCK_SIZES[Q(qtype)][0]


def type_size(qtype: Q) -> int:
    """Bytes per block of `qtype`."""
    return BLOCK_SIZES[Q(qtype)][1]


def nbytes(qtype: Q, shape: Sequence[int]) -> int:
    """Bytes a tensor of `shape` takes in `qtype` (its last dimension must be a whole number of blocks)."""
    bs, ts = BLOCK_SIZES[Q(qtype)]
    n = 1
    for d in shape:
        n *= int(d)
    if int(shape[-1]) % bs:
        raise ValueError(f"row size {shape[-1]} is not a multiple of the {Q(qtype).name} block size {bs}")
    return n // bs * ts


# ---------------------------------------------------------------------------------- bit helpers
def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32 (little-endian f16)."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[n, k] packed bytes -> [n, 2k] values: per `group` bytes, the low nibbles then the high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, group)
    q = torch.cat((q & 0x0F, q >> 4), dim=2)
    return q.reshape(n, -1)


def _bits(b: torch.Tensor, width: int, group: int) -> torch.Tensor:
    """[n, k] bytes -> [n, (8 // width) * k] fields of `width` bits: per `group` bytes, shift 0 first."""
    n = b.shape[0]
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=b.device).reshape(1, 1, -1, 1)
    q = (b.reshape(n, -1, 1, group) >> shifts) & ((1 << width) - 1)
    return q.reshape(n, -1)


# ---------------------------------------------------------------------------------- block formats
# Each takes [n_blocks, type_size] uint8 and returns [n_blocks, block_size] float32.
def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).to(torch.int8) - 8
    return d * q.to(torch.float32)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).to(torch.float32)
    return d * q + m


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits (bit i = value i's fifth bit)."""
    return _bits(qh, 1, 4).reshape(-1, 8, 4).transpose(1, 2).reshape(-1, 32)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = (_nibbles(b[:, 6:], 16) | (_q5_high(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return d * q.to(torch.float32)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = (_nibbles(b[:, 8:], 16) | (_q5_high(b[:, 4:8]) << 4)).to(torch.float32)
    return d * q + m


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    return b[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales, qs = b[:, :16], b[:, 16:80]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _bits(qs, 2, 32).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, sc = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16(b[:, 108:110])
    # 16 6-bit scales: low 4 bits from bytes 0-7 (low nibbles, then high), high 2 bits from bytes 8-11.
    lo = _nibbles(sc[:, :8], 8)
    hi = _bits(sc[:, 8:], 2, 4)
    scales = ((lo | (hi << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs, 2, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 32).reshape(n, 16, 16) ^ 1  # a set bit means "no -4 offset"
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> 8 6-bit scales and 8 6-bit mins (get_scale_min_k4)."""
    n = sc.shape[0]
    s = sc.reshape(n, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scale, mins


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:], 32).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    dl = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
    qh = _bits(b[:, 16:48], 1, 32).reshape(n, 8, 32)
    ql = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    q = (ql | (qh << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16(b[:, 208:210])
    dl = (d * sc.contiguous().view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    lo = _nibbles(ql, 64).reshape(n, 8, 32)
    hi = _bits(qh, 2, 32).reshape(n, 8, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(n, 16, 16).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _iq4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=device)


def _iq4_nl(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _iq4_table(b.device)[_nibbles(b[:, 2:], 16).long()]
    return d * q


def _iq4_xs(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b[:, :2])
    # 8 6-bit scales: low nibbles in bytes 4-7 (low, then high nibble per byte), 2 high bits each in
    # the little-endian uint16 of bytes 2-3.
    lo = torch.stack((b[:, 4:8] & 0x0F, b[:, 4:8] >> 4), dim=-1).reshape(n, 8)
    hi = _bits(b[:, 2:4], 2, 1).reshape(n, 8)
    scales = ((lo | (hi << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * scales).reshape(n, 8, 1)
    q = _iq4_table(b.device)[_nibbles(b[:, 8:], 16).long()].reshape(n, 8, 32)
    return (dl * q).reshape(n, QK_K)


def _q8_k(b: torch.Tensor) -> torch.Tensor:
    # dequantize_row_q8_K: y = d * q with an f32 d (the block sums only serve ggml's dot products).
    d = b[:, :4].contiguous().view(torch.float32)
    return d * b[:, 4:4 + QK_K].contiguous().view(torch.int8).to(torch.float32)


_BLOCK_DEQUANT: dict[Q, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0,
    Q.Q2_K: _q2_k, Q.Q3_K: _q3_k, Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
    Q.IQ4_NL: _iq4_nl, Q.IQ4_XS: _iq4_xs, Q.Q8_K: _q8_k,
}
SUPPORTED_TYPES: frozenset[Q] = frozenset(BLOCK_SIZES)

# Rows of blocks dequantized per chunk: bounds the temporaries (a few x the f32 output of a chunk).
_CHUNK_BLOCKS = 1 << 16


def dequantize(raw: torch.Tensor, qtype: Q, shape: Sequence[int]) -> torch.Tensor:
    """Float32 tensor of `shape` from the raw bytes of a GGUF tensor stored as `qtype`.

    raw: uint8 tensor (any shape, contiguous) of exactly `nbytes(qtype, shape)` bytes. `shape` is in
    PyTorch order, the last dimension being the contiguous one (GGUF's first dimension).
    """
    qtype = Q(qtype)
    if qtype not in BLOCK_SIZES:
        raise NotImplementedError(f"dequantization of GGUF type {qtype.name} is not supported")
    shape = tuple(int(s) for s in shape)
    want = nbytes(qtype, shape)
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8 or flat.numel() != want:
        raise ValueError(f"{qtype.name} tensor of shape {shape} needs {want} uint8 bytes, "
                         f"got {flat.numel()} {flat.dtype}")
    if qtype == Q.F32:
        return flat.contiguous().view(torch.float32).reshape(shape)
    if qtype == Q.F16:
        return flat.contiguous().view(torch.float16).to(torch.float32).reshape(shape)
    if qtype == Q.BF16:
        return flat.contiguous().view(torch.bfloat16).to(torch.float32).reshape(shape)
    bs, ts = BLOCK_SIZES[qtype]
    fn = _BLOCK_DEQUANT[qtype]
    blocks = flat.reshape(-1, ts)
    n = blocks.shape[0]
    if n <= _CHUNK_BLOCKS:
        return fn(blocks).reshape(shape)
    out = torch.empty(n, bs, dtype=torch.float32, device=raw.device)
    for start in range(0, n, _CHUNK_BLOCKS):
        out[start:start + _CHUNK_BLOCKS] = fn(blocks[start:start + _CHUNK_BLOCKS])
    return out.reshape(shape)
