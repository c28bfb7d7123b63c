"""CPU matmuls over GGUF blocks with int8 activations (the ``kernels.cpu`` C++ extension), llama.cpp style.

Every GGUF block type is held, *exactly*, as ``w = u * d + m`` per group with ``u`` unsigned
(4 bits for Q4_0 / Q4_1 / Q4_K and, with 16-value groups, Q2_K / Q3_K; 5 for Q5_0 / Q5_1 / Q5_K;
8 for Q8_0 / Q8_K / IQ4_NL / IQ4_XS; 6 for Q6_K, with 16-value groups) and (d, m) in f16 where that
is exact (Q4_1 keeps its file bytes), else f32 (the K-quants' d * scale products). A group is a
block of 32 values, or each half of one for the K-quants with 16-value sub-blocks (Q2_K, Q3_K: two
(d, m) per 32 values; Q6_K keeps the file's f16 d and int8 sub-block scales, m = -32 d implied:
0.875 byte a weight against the file's 0.82). Signed types store ``u = q + 128`` (or + 4, + 8, + 16,
+ 32) with the offset folded into m.

The product quantizes each activation row to int8 blocks of 32 once per call (llama.cpp's q8_1:
scale amax / 127, round to nearest) and sums integer dot products per group (AVX512-VNNI
``vpdpbusd``, AVX2 ``vpmaddubsw`` / ``vpmaddwd``, or the portable scalar loop: the build variant
``kernels.cpu`` chose for this CPU), parallel over output rows. Every variant's integer sums are exact,
so they agree to float32 summation order. Against dequantize + float32 matmul the error is that of
the int8 activations, ~2-4e-3 of max |y| (what llama.cpp's CPU backend computes too), so it is used
for bfloat16 compute only, whose own rounding is of that size; float32 keeps the exact paths.
Prefill-sized inputs take the same kernel: it beats expanding the weight for oneDNN at every row
count measured (64-512 rows: 1.3-8x). ``expand`` / ``dequantized`` are the plain-PyTorch reference
of the tiled layout (exact: equal to ``gguf.dequant.dequantize``).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from mistralpy.kernels import cpu as cpu_ext
from mistralpy.quant.gguf.dequant import IQ4NL_VALUES, _bits, _f16, _k_scale_min, _nibbles, _q5_high

__all__ = ["CPU_EXT_TYPES", "CpuQMatmulKernel", "available", "encode_affine", "fast"]

log = logging.getLogger(__name__)

GROUP = 32
_FOUR_BIT = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q2_K, Q.Q3_K})
_CHUNK_ELEMS = 1 << 22


def _iq4(nib: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4NL_VALUES, dtype=torch.int16, device=nib.device) + 128
    return table[nib.long()].to(torch.uint8)


def _aff(u: torch.Tensor, d: torch.Tensor, m: torch.Tensor, halves: int = 1
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return u.reshape(-1, GROUP).to(torch.uint8), d.reshape(-1, halves), m.reshape(-1, halves)


def _enc(b: torch.Tensor, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocks [n, type_size] -> u uint8 [B, 32], d f32 [B, g], m f32 [B, g] with w = u * d + m exactly
    per group (g = 1: the whole 32-value block; g = 2: each half, the K-quants' 16-value sub-blocks)."""
    n = b.shape[0]
    if qtype == Q.Q2_K:   # w = d sc_lo q - dmin sc_hi, q in 0..3
        sc, d, dmin = b[:, :16], _f16(b[:, 80:82]), _f16(b[:, 82:84])
        dl = d * (sc & 0x0F).to(torch.float32)
        return _aff(_bits(b[:, 16:80], 2, 32), dl, -dmin * (sc >> 4).to(torch.float32), 2)
    if qtype == Q.Q3_K:   # w = d (sc - 32) (q - 4), q = low 2 bits | high bit << 2 in 0..7
        d, sc = _f16(b[:, 108:110]), b[:, 96:108]
        scales = ((_nibbles(sc[:, :8], 8) | (_bits(sc[:, 8:], 2, 4) << 4)).to(torch.int8) - 32).to(torch.float32)
        u = _bits(b[:, 32:96], 2, 32) | (_bits(b[:, :32], 1, 32) << 2)
        dl = d * scales
        return _aff(u, dl, -4 * dl, 2)
    if qtype == Q.Q6_K:   # w = d sc (q - 32), q in 0..63
        d = _f16(b[:, 208:210])
        dl = d * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
        u = _nibbles(b[:, :128], 64) | (_bits(b[:, 128:192], 2, 32) << 4)
        return _aff(u, dl, -32 * dl, 2)
    if qtype == Q.Q8_K:   # an f32 d per 256 values
        d = b[:, :4].contiguous().view(torch.float32).expand(n, 8)
        return _aff(b[:, 4:260].contiguous().view(torch.int8).to(torch.int16) + 128, d, -128 * d)
    if qtype == Q.Q4_0:
        d = _f16(b[:, :2])
        return _aff(_nibbles(b[:, 2:], 16), d, -8 * d)
    if qtype == Q.Q4_1:
        return _aff(_nibbles(b[:, 4:], 16), _f16(b[:, :2]), _f16(b[:, 2:4]))
    if qtype == Q.Q5_0:
        d = _f16(b[:, :2])
        return _aff(_nibbles(b[:, 6:], 16) | (_q5_high(b[:, 2:6]) << 4), d, -16 * d)
    if qtype == Q.Q5_1:
        return _aff(_nibbles(b[:, 8:], 16) | (_q5_high(b[:, 4:8]) << 4), _f16(b[:, :2]), _f16(b[:, 2:4]))
    if qtype == Q.Q8_0:
        d = _f16(b[:, :2])
        return _aff(b[:, 2:].contiguous().view(torch.int8).to(torch.int16) + 128, d, -128 * d)
    if qtype == Q.IQ4_NL:
        d = _f16(b[:, :2])
        return _aff(_iq4(_nibbles(b[:, 2:], 16)), d, -128 * d)
    if qtype == Q.IQ4_XS:
        d = _f16(b[:, :2])
        lo = torch.stack((b[:, 4:8] & 0x0F, b[:, 4:8] >> 4), dim=-1).reshape(n, 8)
        hi = _bits(b[:, 2:4], 2, 1).reshape(n, 8)
        dl = d * ((lo | (hi << 4)).to(torch.int8) - 32).to(torch.float32)
        return _aff(_iq4(_nibbles(b[:, 8:], 16)), dl, -128 * dl)
    if qtype in (Q.Q4_K, Q.Q5_K):
        d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
        sc, mn = _k_scale_min(b[:, 4:16])
        dl, ml = d * sc.to(torch.float32), dmin * mn.to(torch.float32)
        if qtype == Q.Q4_K:
            u = _nibbles(b[:, 16:], 32)
        else:
            u = _nibbles(b[:, 48:], 32) | (_bits(b[:, 16:48], 1, 32) << 4)
        return _aff(u, dl, -ml)
    raise NotImplementedError(qtype.name)


CPU_EXT_TYPES: frozenset[Q] = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL, Q.IQ4_XS, Q.Q4_K,
                                         Q.Q5_K, Q.Q2_K, Q.Q3_K, Q.Q6_K, Q.Q8_K})


def _exact_f16(t: torch.Tensor) -> bool:
    h = t.to(torch.float16)
    return bool(torch.isfinite(h).all()) and torch.equal(h.to(torch.float32), t)


_TILE = 16


_FIVE_BIT = frozenset({Q.Q5_0, Q.Q5_1, Q.Q5_K})


# qmm's weight formats (qmatmul.cpp): fmt -> (bits of u, f32 scales, groups per 32 values, m stored)
FORMATS: dict[int, tuple[int, bool, int, bool]] = {
    4: (4, False, 1, True), 5: (4, True, 1, True), 6: (8, False, 1, True), 7: (8, True, 1, True),
    8: (5, False, 1, True), 9: (5, True, 1, True), 21: (4, True, 2, True),
    31: (6, True, 2, False),   # Q6_K: f16 d per row and int8 sc per group (d_g = d sc_g), m = -32 d_g
}
SIX_BIT_OFFSET = -32.0


def _six_bit_scales(raw: torch.Tensor, n: int, nb: int, tiles: int, pad: int, d: torch.Tensor) -> list[torch.Tensor]:
    """Q6_K's scales as the file keeps them, per tile-block: f16 d [16 rows] (its superblock's), then
    int8 sc [2 groups][16 rows]; checked to multiply back to the exact group scales `d`."""
    b = raw.reshape(-1, 210)
    d16 = b[:, 208:210].contiguous().view(torch.float16).reshape(n, -1, 1).expand(-1, -1, 8).reshape(n, nb)
    sc = b[:, 192:208].contiguous().view(torch.int8).reshape(n, nb, 2)
    if not torch.equal(d16.float().unsqueeze(-1) * sc.float(), d.reshape(n, nb, 2)):
        raise ValueError("Q6_K scales do not multiply back to the group scales")
    d16 = F.pad(d16, (0, 0, 0, pad)).reshape(tiles, _TILE, nb).transpose(1, 2).contiguous().view(torch.uint8)
    sc = F.pad(sc, (0, 0, 0, 0, 0, pad)).reshape(tiles, _TILE, nb, 2).permute(0, 2, 3, 1).contiguous()
    return [d16.reshape(tiles, nb, 32), sc.view(torch.uint8).reshape(tiles, nb, 32)]


def encode_affine(raw: torch.Tensor, qtype: Q, out_features: int, in_features: int) -> tuple[torch.Tensor, int]:
    """raw uint8 [N, row_bytes] GGUF rows -> (tiled uint8 [ceil(N / 16), K / 32, tile_bytes], fmt) for
    ``qmm``, fmt one of ``FORMATS``."""
    from mistralpy.quant.gguf.dequant import BLOCK_SIZES

    ts = BLOCK_SIZES[qtype][1]
    u, d, m = _enc(raw.reshape(-1, ts), qtype)
    bits = 4 if qtype in _FOUR_BIT else 5 if qtype in _FIVE_BIT else 6 if qtype == Q.Q6_K else 8
    groups = d.shape[1]
    f16 = groups == 1 and _exact_f16(d) and _exact_f16(m)   # qmm's two-group formats are f32 only
    sdt = torch.float16 if f16 else torch.float32
    nb = in_features // GROUP
    tiles = -(-out_features // _TILE)
    pad = tiles * _TILE - out_features
    u = F.pad(u.reshape(out_features, nb * GROUP), (0, 0, 0, pad)).reshape(tiles, _TILE, nb, 8, 4)
    u = u.permute(0, 2, 3, 1, 4)                                   # [T, nb, quad, row, 4]
    if bits == 5:   # fifth bits as one 64-bit little-endian mask per quad (bit 4 r + i)
        hi = ((u >> 4) & 1).reshape(tiles, nb, 8, 8, 8)
        hi = (hi << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)   # [T, nb, 8, 8 bytes]
        u = u & 0x0F
    if bits == 6:   # top two bits of quad v (low nibbles) / 4 + v (high) at bits 2 v of two vectors
        top = (u >> 4).reshape(tiles, nb, 2, 4, _TILE, 4)
        top = (top << (2 * torch.arange(4, dtype=torch.uint8)).reshape(1, 1, 1, 4, 1, 1)).sum(3, dtype=torch.uint8)
        u = u & 0x0F
    if bits != 8:
        u = u[:, :, :4] | (u[:, :, 4:] << 4)
    if bits == 5:
        u = torch.cat((u.reshape(tiles, nb, -1), hi.reshape(tiles, nb, -1)), dim=2)
    if bits == 6:
        u = torch.cat((u.reshape(tiles, nb, -1), top.reshape(tiles, nb, -1)), dim=2)
        if not torch.equal(m, SIX_BIT_OFFSET * d):
            raise ValueError("6-bit blocks need m = -32 d")
        sc = _six_bit_scales(raw, out_features, nb, tiles, pad, d)
    else:
        sc = [F.pad(v.reshape(out_features, nb * groups), (0, 0, 0, pad)).reshape(tiles, _TILE, nb, groups)
              .permute(0, 2, 3, 1).reshape(tiles, nb, groups * _TILE)
              .to(sdt).contiguous().view(torch.uint8) for v in (d, m)]  # [T, nb, g * 16 * sb]
    packed = torch.cat((*sc, u.reshape(tiles, nb, -1)), dim=2).contiguous()
    fmt = next(f for f, spec in FORMATS.items() if spec == (bits, not f16, groups, bits != 6))
    return packed, fmt


_state: dict[str, bool] = {}


def _register_fake(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::qmm")
    def _(x, w, fmt, n):
        return x.new_empty(x.shape[0], n)


cpu_ext.register_fakes(_register_fake)


def available() -> bool:
    """True when the C++ extension is built and loaded (built on the first call)."""
    if "ok" not in _state:
        _state["ok"] = cpu_ext.load()
    return _state["ok"]


def fast() -> bool:
    """True when the extension is loaded and took a SIMD path (AVX512-VNNI or AVX2): then it is the
    fastest kernel for every type it covers. The scalar build (plain x86-64, aarch64) is correct but
    slower than torch's int4 kernel, so GGUF weights there take ``gguf.kernels.Int4PlaneKernel``."""
    if "fast" not in _state:
        _state["fast"] = available() and cpu_ext.isa() in ("avx512vnni", "avx2")
        if available() and not _state["fast"]:
            log.info("CPU quantized-matmul extension has no SIMD path here: using torch's int4 kernels")
    return _state["fast"]


class CpuQMatmulKernel:
    """bfloat16 (or float32 on request) CPU matmul over the affine int blocks via ``mistralpy_cpu::qmm``."""

    def __init__(self, raw: torch.Tensor, qtype: Q, out_features: int, in_features: int, dtype: torch.dtype):
        self.qtype, self.out_features, self.in_features, self.dtype = qtype, out_features, in_features, dtype
        self.packed, self.fmt = encode_affine(raw, qtype, out_features, in_features)
        self._op = cpu_ext.ops().qmm.default

    def nbytes(self) -> int:
        return self.packed.numel()

    def expand(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) of W [rows, K] in `dtype` (exact in float32)."""
        t0, t1 = start // _TILE, -(-stop // _TILE)
        blk = self.packed[t0:t1]                                        # [T, nb, tile_bytes]
        tiles, nb = blk.shape[0], blk.shape[1]
        bits, f32, g, has_m = FORMATS[self.fmt]
        sdt, sb = (torch.float32, 64 * g) if f32 else (torch.float16, 32)
        if bits == 6:   # f16 d [16] and int8 sc [2, 16]: d_g = d sc_g
            sb = 64
            d16 = blk[..., :32].contiguous().view(torch.float16).float().reshape(tiles, nb, 1, _TILE)
            dg = d16 * blk[..., 32:64].contiguous().view(torch.int8).float().reshape(tiles, nb, g, _TILE)
        else:
            dg = blk[..., :sb].contiguous().view(sdt).float().reshape(tiles, nb, g, _TILE)
        mb = sb if has_m else 0
        d = dg.permute(0, 3, 1, 2)   # [T, nb, g, 16] -> [T, 16, nb, g]
        if has_m:
            m = blk[..., sb:sb + mb].contiguous().view(sdt).float().reshape(tiles, nb, g, _TILE).permute(0, 3, 1, 2)
        else:
            m = d * SIX_BIT_OFFSET
        vals = blk[..., sb + mb:]
        if bits == 8:
            q = vals.reshape(tiles, nb, 8, _TILE, 4)
        else:
            lo = vals[..., :256].reshape(tiles, nb, 4, _TILE, 4)
            q = torch.cat((lo & 0x0F, lo >> 4), dim=2)                          # [T, nb, quad, row, 4]
            if bits == 5:
                masks = vals[..., 256:].reshape(tiles, nb, 8, 8, 1)
                hi = (masks >> torch.arange(8, dtype=torch.uint8)) & 1             # [T, nb, 8, 8, 8]
                q = q | (hi.reshape(tiles, nb, 8, _TILE, 4) << 4)
            if bits == 6:
                top = vals[..., 256:].reshape(tiles, nb, 2, 1, _TILE, 4)
                top = (top >> (2 * torch.arange(4, dtype=torch.uint8)).reshape(1, 1, 1, 4, 1, 1)) & 3
                q = q | (top.reshape(tiles, nb, 8, _TILE, 4) << 4)
        q = q.permute(0, 3, 1, 2, 4).reshape(tiles, _TILE, nb, g, GROUP // g)
        # f32 scales: u * d + m in float64 is exact (<= 32 significant bits), so one rounding to f32
        # gives the reference's d * q (Q8_K's u * d alone would round in f32 before the offset)
        wdt = torch.float64 if f32 else torch.float32
        w = q.to(wdt).mul_(d.unsqueeze(-1).to(wdt)).add_(m.unsqueeze(-1).to(wdt)).to(torch.float32)
        w = w.reshape(tiles * _TILE, self.in_features)[start - t0 * _TILE:stop - t0 * _TILE]
        return w.to(dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == self.dtype and x.is_contiguous():   # the common decode call
            return self._op(x, self.packed, self.fmt, self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        y = self._op(x2, self.packed, self.fmt, self.out_features)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        step = max(_TILE, _CHUNK_ELEMS // self.in_features // _TILE * _TILE)
        return torch.cat([self.expand(s, min(s + step, self.out_features))
                          for s in range(0, self.out_features, step)])
