"""In-situ quantization (ISQ): float weights -> raw GGUF block bytes, in vectorized PyTorch.

`quantize(weight, qtype)` turns a float [N, K] matrix into the uint8 [N, row_bytes] a GGUF file
would hold for it, so a loader can quantize Hugging Face weights at load time and reuse the GGUF
matmul paths (`gguf.dequant.dequantize` reads the bytes back).

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 are bit-exact with `gguf.quants.quantize` (itself bit-exact with
  ggml's reference quantizers). Q8_K (not in `gguf.quants`) follows ggml's quantize_row_q8_K_ref
  operation for operation (tested against a scalar port of it).
- Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS follow llama.cpp's reference quantizers without an
  importance matrix (see `gguf.quantize_kquants`); on random weights most blocks come out byte-for-
  byte as llama.cpp's `llama_model_quantize` writes them, the rest differ only where two scale
  candidates tie to float rounding.

Round-trip error (RMS of dequantize(quantize(w)) - w over RMS of w) on Gaussian weights, measured
on a 256 x 4096 matrix; the tests bound it at about 5% above these:
Q8_0 0.54%, Q8_K 0.70%, Q6_K 1.77%, Q5_K 3.61%, Q5_1 3.79%, Q5_0 4.27%, Q4_K 7.14%, IQ4_NL 7.6%, IQ4_XS 7.7%,
Q4_1 7.82%, Q4_0 8.59%, Q3_K 15.1%, Q2_K 29.6%. (Real weights, heavier-tailed, are similar.)

Speed, one thread of this 2-core CPU: legacy types 130-380 Mparam/s, the searching types 6-14
Mparam/s. With intra-op threads on cores shared with other work, the OpenMP barriers of the many
mid-size ops cost more than they gain: prefer torch.set_num_threads(1) around bulk ISQ there.

Work goes chunk by chunk of blocks, so memory beyond the output stays bounded whatever the matrix.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.quant.gguf import quantize_kquants as kq
from mistralpy.quant.gguf.dequant import BLOCK_SIZES

__all__ = ["QUANTIZABLE_TYPES", "quantize"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- legacy types
def _round_away(x: torch.Tensor) -> torch.Tensor:
    """roundf (halves away from zero) computed as gguf's np_roundf does, exactly."""
    a = x.abs()
    f = a.floor()
    return (f + (2 * (a - f)).floor_()).copysign_(x)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _q5_high_bytes(q: torch.Tensor) -> torch.Tensor:
    """[n, 32] 5-bit values -> [n, 4] bytes: bit i of the little-endian uint32 is value i's bit 4."""
    bits = (q.to(torch.int32) >> 4).reshape(-1, 4, 8) << torch.arange(8, dtype=torch.int32, device=q.device)
    return bits.sum(dim=2).to(torch.uint8)


def _symmetric(x: torch.Tensor, div: float, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = (signed absmax) / -div, q = trunc(x/d + div + 0.5) in [0, levels)."""
    _, vmax = kq.signed_absmax(x)
    d = (vmax / -div).unsqueeze(1)
    q = torch.trunc(x * _inverse(d) + (div + 0.5)).clamp_(0, levels - 1).to(torch.uint8)
    return d, q


def _affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max - min) / (levels - 1), q = trunc((x - min)/d + 0.5) in [0, levels)."""
    lo = x.amin(dim=1, keepdim=True)
    d = (x.amax(dim=1, keepdim=True) - lo) / (levels - 1)
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp_(0, levels - 1).to(torch.uint8)
    return d, lo, q


def _encode_q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(x * _inverse(d)).to(torch.int8).view(torch.uint8)
    return torch.cat((kq.f16_bytes(d), q), dim=1)


def _encode_q4_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 8.0, 16)
    return torch.cat((kq.f16_bytes(d), kq.pack_nibbles(q, 16)), dim=1)


def _encode_q5_0(x: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric(x, 16.0, 32)
    return torch.cat((kq.f16_bytes(d), _q5_high_bytes(q), kq.pack_nibbles(q & 0xF, 16)), dim=1)


def _encode_q4_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _affine(x, 16)
    return torch.cat((kq.f16_bytes(d), kq.f16_bytes(lo), kq.pack_nibbles(q, 16)), dim=1)


def _encode_q5_1(x: torch.Tensor) -> torch.Tensor:
    d, lo, q = _affine(x, 32)
    return torch.cat((kq.f16_bytes(d), kq.f16_bytes(lo), _q5_high_bytes(q), kq.pack_nibbles(q & 0xF, 16)), dim=1)


def _encode_q8_k(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_K_ref: iscale = -127 / (signed absmax), q = min(127, nearest(iscale x)),
    d = 1 / iscale (f32), block sums per 16 values; an all-zero block is d = 0, q = 0."""
    n = x.shape[0]
    amax, vmax = kq.signed_absmax(x)
    zero = amax == 0
    # A true division (a Python scalar over a tensor is reciprocal-then-multiply: two roundings).
    iscale = torch.where(zero, torch.zeros_like(vmax), torch.full_like(vmax, -127.0).div_(vmax)).unsqueeze(1)
    # torch.round is half-to-even, as nearest_int's 1.5 * 2^23 trick.
    q = torch.round(x * iscale).clamp_(max=127).to(torch.int8)
    d = torch.where(zero, torch.zeros_like(vmax), 1 / iscale.squeeze(1)).reshape(n, 1)
    bsums = q.reshape(n, 16, 16).sum(dim=2, dtype=torch.int32).to(torch.int16)
    return torch.cat((d.view(torch.uint8), q.view(torch.uint8), bsums.view(torch.uint8)), dim=1)


# ---------------------------------------------------------------------------------- dispatch
# qtype -> (block encoder, float values per chunk). Q6_K and the IQ4 types hold all ~20 scale
# candidates at once ([groups, candidates, values]): their chunks are smaller so that stays in cache.
_ENCODERS: dict[Q, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    Q.Q4_0: (_encode_q4_0, 1 << 18),
    Q.Q4_1: (_encode_q4_1, 1 << 18),
    Q.Q5_0: (_encode_q5_0, 1 << 18),
    Q.Q5_1: (_encode_q5_1, 1 << 18),
    Q.Q8_0: (_encode_q8_0, 1 << 18),
    Q.Q8_K: (_encode_q8_k, 1 << 18),
    Q.Q2_K: (kq.encode_q2_k, 1 << 18),
    Q.Q3_K: (kq.encode_q3_k, 1 << 18),
    Q.Q4_K: (kq.encode_q4_k, 1 << 18),
    Q.Q5_K: (kq.encode_q5_k, 1 << 18),
    Q.Q6_K: (kq.encode_q6_k, 1 << 15),
    Q.IQ4_NL: (kq.encode_iq4_nl, 1 << 15),
    Q.IQ4_XS: (kq.encode_iq4_xs, 1 << 15),
}
QUANTIZABLE_TYPES: frozenset[Q] = frozenset(_ENCODERS)


def quantize(weight: torch.Tensor, qtype: Q) -> torch.Tensor:
    """Float [N, K] weight (any float dtype, any device) -> uint8 [N, row_bytes] in GGUF's layout.

    Raises ValueError when `qtype` cannot be encoded or K is not a whole number of its blocks.
    """
    qtype = Q(qtype)
    if qtype not in _ENCODERS:
        supported = ", ".join(sorted(q.name for q in QUANTIZABLE_TYPES))
        raise ValueError(f"cannot quantize to {qtype.name}; supported: {supported}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    bs, ts = BLOCK_SIZES[qtype]
    if k % bs:
        raise ValueError(f"row size {k} is not a multiple of the {qtype.name} block size {bs}")
    encode, chunk_values = _ENCODERS[qtype]
    blocks = weight.reshape(-1, bs)
    out = torch.empty(blocks.shape[0], ts, dtype=torch.uint8, device=weight.device)
    step = max(1, chunk_values // bs)
    for start in range(0, blocks.shape[0], step):
        x = blocks[start:start + step].to(torch.float32)
        out[start:start + step] = encode(x)
    return out.reshape(n, k // bs * ts)
