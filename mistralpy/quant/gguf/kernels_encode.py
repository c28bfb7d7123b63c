"""Re-encoding of GGUF blocks as 4-bit "planes" for torch's CPU int4 matmul (tinygemm convention).

`torch.ops.aten._weight_int4pack_mm_for_cpu` computes ``y = x' @ W'^T`` with
``W'[n, k] = (nib[n, k] - 8) * scale[k // 32, n] + zero[k // 32, n]`` for 4-bit ``nib``. Every GGUF
block type is written *exactly* in that form over a longer reduction axis K' >= K, whose columns
read the activations through a gather ``x' = x_ext[:, idx] * mult`` (``x_ext`` = x plus a zero
column for padding; ``mult`` is 1 or a power of two, so the gather is exact in any float dtype):

- 4-bit affine types (Q4_0, Q4_1, Q4_K): one plane, K' = K.
- 5- and 8-bit types and the IQ4 codebook (Q5_0, Q5_1, Q5_K, Q8_0, Q8_K, IQ4_NL, IQ4_XS): the integer is
  split as ``16 * hi + lo``, a low plane and a high plane of 32-groups (scale s and 16 s), K' = 2K.
- Q6_K (16-value sub-blocks, q = lo + 16 hi with 2-bit hi): each sub-block becomes one group of 32
  holding its 16 low nibbles and 16 nibbles ``2 hi + 5`` read through x * 8, which puts the -32
  offset exactly into the kernel's -8 (``lo - 8 + 8 (2 hi + 5 - 8) = lo + 16 hi - 32``); K' = 2K.
- Q2_K, Q3_K (16-value sub-blocks): each sub-block is padded to a group of 32 with a zero column.

Scales and zeros are computed in float32 from the f16 block fields (zero = offset + 8 * scale is
the only rounding step, ~1 ulp of f32).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.quant.gguf.dequant import BLOCK_SIZES, IQ4NL_VALUES, _bits, _f16, _k_scale_min, _nibbles, _q5_high

__all__ = ["PLANE_TYPES", "Planes", "encode_planes"]

GROUP = 32


@dataclass(slots=True)
class Planes:
    """The int4 form of a weight [N, K]: W = sum over K' of the planes, read through (idx, mult)."""
    nib: torch.Tensor     # uint8 [N, K'] values 0..15
    scale: torch.Tensor   # float32 [N, K'/32]
    zero: torch.Tensor    # float32 [N, K'/32]
    idx: torch.Tensor | None   # int32 [K'] column of x (K = the zero column), None when K' = K in order
    mult: torch.Tensor | None  # float32 [K'] power-of-two factors, None when all ones
    fold: tuple[int, float, float] | None  # W from W' [N, K']: see _Layout.fold


@dataclass(slots=True, frozen=True)
class _Layout:
    """Per block: `groups` groups of 32; src[g, i] = value index within the block (-1 = padding)."""
    groups: int
    src: tuple[tuple[int, ...], ...]
    mult: tuple[tuple[float, ...], ...] | None = None
    # (h, a, b): W' viewed [N, -1, 2, h] folds back to W = a * W'[:, :, 0] + b * W'[:, :, 1] (b = 0
    # drops padding); None when W' = W.
    fold: tuple[int, float, float] | None = None


def _plain(bs: int) -> _Layout:
    return _Layout(bs // GROUP, tuple(tuple(range(g * GROUP, (g + 1) * GROUP)) for g in range(bs // GROUP)))


def _split(bs: int) -> _Layout:
    """Low plane then high plane of each 32-value sub-block."""
    src = []
    for g in range(bs // GROUP):
        vals = tuple(range(g * GROUP, (g + 1) * GROUP))
        src += [vals, vals]
    return _Layout(len(src), tuple(src), fold=(GROUP, 1.0, 1.0))


def _padded16() -> _Layout:
    return _Layout(16, tuple(tuple(range(g * 16, g * 16 + 16)) + (-1,) * 16 for g in range(16)),
                   fold=(16, 1.0, 0.0))


def _q6k_layout() -> _Layout:
    src = tuple(tuple(range(g * 16, g * 16 + 16)) * 2 for g in range(16))
    return _Layout(16, src, tuple((1.0,) * 16 + (8.0,) * 16 for _ in range(16)), fold=(16, 1.0, 8.0))


# ---------------------------------------------------------------------- per-type block encoders
# Each maps blocks [n, type_size] uint8 -> (nib [n, groups, 32] uint8, scale, zero [n, groups] f32),
# groups ordered as in the type's _Layout.
_Enc = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _hi_lo(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed ints in [-128, 127] -> (hi + 8, lo) nibbles with v = 16 hi + lo."""
    v = v.to(torch.int16)
    return ((v >> 4) + 8).to(torch.uint8), (v & 0x0F).to(torch.uint8)


def _two_planes(v: torch.Tensor, dl: torch.Tensor) -> _Enc:
    """v [n, G, 32] signed ints, dl [n, G] f32 scales -> w = dl * v as (lo, hi) planes per sub-block."""
    n, g, _ = v.shape
    hi, lo = _hi_lo(v)
    nib = torch.stack((lo, hi), dim=2).reshape(n, 2 * g, GROUP)
    scale = torch.stack((dl, 16 * dl), dim=2).reshape(n, 2 * g)
    zero = torch.stack((8 * dl, torch.zeros_like(dl)), dim=2).reshape(n, 2 * g)
    return nib, scale, zero


def _five_bit(lo: torch.Tensor, h: torch.Tensor, dl: torch.Tensor, off: torch.Tensor) -> _Enc:
    """w = dl * (lo + 16 h) + off, lo/h [n, G, 32], dl/off [n, G]."""
    n, g, _ = lo.shape
    nib = torch.stack((lo, h + 8), dim=2).reshape(n, 2 * g, GROUP).to(torch.uint8)
    scale = torch.stack((dl, 16 * dl), dim=2).reshape(n, 2 * g)
    zero = torch.stack((8 * dl + off, torch.zeros_like(dl)), dim=2).reshape(n, 2 * g)
    return nib, scale, zero


def _enc_q4_0(b: torch.Tensor) -> _Enc:
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:], 16).reshape(-1, 1, GROUP), d, torch.zeros_like(d)


def _enc_q4_1(b: torch.Tensor) -> _Enc:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:], 16).reshape(-1, 1, GROUP), d, m + 8 * d


def _enc_q5_0(b: torch.Tensor) -> _Enc:
    d = _f16(b[:, :2])
    lo, h = _nibbles(b[:, 6:], 16), _q5_high(b[:, 2:6])
    return _five_bit(lo.reshape(-1, 1, GROUP), h.reshape(-1, 1, GROUP), d, -16 * d)


def _enc_q5_1(b: torch.Tensor) -> _Enc:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    lo, h = _nibbles(b[:, 8:], 16), _q5_high(b[:, 4:8])
    return _five_bit(lo.reshape(-1, 1, GROUP), h.reshape(-1, 1, GROUP), d, m)


def _enc_q8_0(b: torch.Tensor) -> _Enc:
    q = b[:, 2:].contiguous().view(torch.int8).reshape(-1, 1, GROUP)
    return _two_planes(q, _f16(b[:, :2]))


def _enc_q8_k(b: torch.Tensor) -> _Enc:
    n = b.shape[0]
    d = b[:, :4].contiguous().view(torch.float32)   # one f32 scale for the 8 sub-blocks of 32
    q = b[:, 4:260].contiguous().view(torch.int8).reshape(n, 8, GROUP)
    return _two_planes(q, d.expand(n, 8))


def _enc_iq4_nl(b: torch.Tensor) -> _Enc:
    table = torch.tensor(IQ4NL_VALUES, dtype=torch.int16, device=b.device)
    v = table[_nibbles(b[:, 2:], 16).long()].reshape(-1, 1, GROUP)
    return _two_planes(v, _f16(b[:, :2]))


def _enc_iq4_xs(b: torch.Tensor) -> _Enc:
    n = b.shape[0]
    d = _f16(b[:, :2])
    lo = torch.stack((b[:, 4:8] & 0x0F, b[:, 4:8] >> 4), dim=-1).reshape(n, 8)
    hi = _bits(b[:, 2:4], 2, 1).reshape(n, 8)
    dl = d * ((lo | (hi << 4)).to(torch.int8) - 32).to(torch.float32)
    table = torch.tensor(IQ4NL_VALUES, dtype=torch.int16, device=b.device)
    v = table[_nibbles(b[:, 8:], 16).long()].reshape(n, 8, GROUP)
    return _two_planes(v, dl)


def _enc_q4_k(b: torch.Tensor) -> _Enc:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    dl, ml = d * sc.to(torch.float32), dmin * m.to(torch.float32)
    return _nibbles(b[:, 16:], 32).reshape(n, 8, GROUP), dl, 8 * dl - ml


def _enc_q5_k(b: torch.Tensor) -> _Enc:
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = _k_scale_min(b[:, 4:16])
    dl, ml = d * sc.to(torch.float32), dmin * m.to(torch.float32)
    h = _bits(b[:, 16:48], 1, 32).reshape(n, 8, GROUP)
    lo = _nibbles(b[:, 48:], 32).reshape(n, 8, GROUP)
    return _five_bit(lo, h, dl, -ml)


def _enc_q6_k(b: torch.Tensor) -> _Enc:
    n = b.shape[0]
    d = _f16(b[:, 208:210])
    dl = d * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)   # [n, 16]
    lo = _nibbles(b[:, :128], 64).reshape(n, 16, 16)
    hi = _bits(b[:, 128:192], 2, 32).reshape(n, 16, 16)
    nib = torch.cat((lo, 2 * hi + 5), dim=2)   # read through x * 8: see the module docstring
    return nib, dl, torch.zeros_like(dl)


def _pad16(q: torch.Tensor) -> torch.Tensor:
    """[n, 16, 16] nibbles -> [n, 16, 32] with 8 (a zero weight) in the padding."""
    return torch.cat((q, torch.full_like(q, 8)), dim=2)


def _enc_q2_k(b: torch.Tensor) -> _Enc:
    n = b.shape[0]
    scales = b[:, :16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = d * (scales & 0x0F).to(torch.float32)
    ml = dmin * (scales >> 4).to(torch.float32)
    q = _bits(b[:, 16:80], 2, 32).reshape(n, 16, 16)
    # q + 8 keeps the zero at -ml (no cancellation against 8 dl when scales round to bf16); the
    # padding columns read x = 0, so the zero does not touch them.
    return _pad16(q + 8), dl, -ml


def _enc_q3_k(b: torch.Tensor) -> _Enc:
    n = b.shape[0]
    d = _f16(b[:, 108:110])
    sc = b[:, 96:108]
    scales = ((_nibbles(sc[:, :8], 8) | (_bits(sc[:, 8:], 2, 4) << 4)).to(torch.int8) - 32)
    dl = d * scales.to(torch.float32)
    ql = _bits(b[:, 32:96], 2, 32).reshape(n, 16, 16)
    qh = _bits(b[:, :32], 1, 32).reshape(n, 16, 16) ^ 1
    q = ql.to(torch.int8) - (qh << 2).to(torch.int8)   # in [-4, 3]
    return _pad16((q + 8).to(torch.uint8)), dl, torch.zeros_like(dl)


_ENCODERS = {
    Q.Q4_0: (_enc_q4_0, _plain(32)), Q.Q4_1: (_enc_q4_1, _plain(32)), Q.Q4_K: (_enc_q4_k, _plain(256)),
    Q.Q5_0: (_enc_q5_0, _split(32)), Q.Q5_1: (_enc_q5_1, _split(32)), Q.Q5_K: (_enc_q5_k, _split(256)),
    Q.Q8_0: (_enc_q8_0, _split(32)), Q.Q8_K: (_enc_q8_k, _split(256)), Q.IQ4_NL: (_enc_iq4_nl, _split(32)), Q.IQ4_XS: (_enc_iq4_xs, _split(256)),
    Q.Q6_K: (_enc_q6_k, _q6k_layout()), Q.Q2_K: (_enc_q2_k, _padded16()), Q.Q3_K: (_enc_q3_k, _padded16()),
}
PLANE_TYPES: frozenset[Q] = frozenset(_ENCODERS)


@lru_cache(maxsize=64)
def _index(qtype: Q, in_features: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(idx, mult) over K' for a row of `in_features` values, None where trivial."""
    bs = BLOCK_SIZES[qtype][0]
    layout = _ENCODERS[qtype][1]
    src = torch.tensor(layout.src, dtype=torch.int64)             # [G, 32]
    nb = in_features // bs
    base = (torch.arange(nb) * bs).reshape(nb, 1, 1)
    idx = torch.where(src >= 0, base + src, in_features).reshape(-1).to(torch.int32)
    mult = None
    if layout.mult is not None:
        mult = torch.tensor(layout.mult, dtype=torch.float32).expand(nb, -1, -1).reshape(-1)
    if mult is None and torch.equal(idx, torch.arange(in_features, dtype=torch.int32)):
        return None, None
    return idx, mult


def encode_planes(raw: torch.Tensor, qtype: Q, in_features: int) -> Planes:
    """raw uint8 [N, row_bytes] GGUF rows -> their exact int4 planes (see the module docstring)."""
    qtype = Q(qtype)
    bs, ts = BLOCK_SIZES[qtype]
    n = raw.shape[0]
    enc, layout = _ENCODERS[qtype]
    nib, scale, zero = enc(raw.reshape(-1, ts))
    g = in_features // bs * layout.groups
    idx, mult = _index(qtype, in_features)
    return Planes(nib.reshape(n, g * GROUP), scale.reshape(n, g), zero.reshape(n, g), idx, mult, layout.fold)
