"""Matmul kernels over GGUF weights that stay quantized in memory.

``make_gguf_kernel(raw, qtype, out, in, dtype=, device=)`` turns the raw block rows of a GGUF (or
ISQ) tensor into a callable ``x [M, in] -> [M, out]`` holding no float copy of the weight. Paths:

- **CPU, bfloat16, the C++ extension with a SIMD path (AVX512-VNNI or AVX2), every block type but
  the float ones** (Q4_0/Q4_1/Q5_x/Q8_0/Q2_K-Q6_K/Q8_K/IQ4_x): ``gguf.kernels_cpu.CpuQMatmulKernel``
  (``kernels/cpu/qmatmul.cpp``), llama.cpp-style int8 activations and integer block dots over
  exact re-encoded blocks, at every row count. One SmolLM2-135M token's matmuls: 2.6 ms against
  5.9 ms for the int4 planes below (Zen 4, 2 threads, 98 MB of blocks). Built once per machine with
  g++; without it (no compiler, the scalar build, float32 compute) the paths below are used.
- **CPU, every quantized type**: the blocks are re-encoded *exactly* as 4-bit planes with group-32
  scales and zeros (``gguf.kernels_encode``; bytes held per weight: 0.5 + 0.125 for Q4_0/Q4_1/Q4_K,
  1 + 0.25 for Q5_*, Q8_0, Q8_K, IQ4_*, Q6_K and the 16-value sub-block types Q2_K/Q3_K).
  ``Int4PlaneKernel`` takes any exact plane encoding and group size: ISQ's HQQ4/HQQ8 use it with
  groups of 64 (``quant/hqq.py``).
  - bfloat16, M < ``_DENSE_MIN_ROWS`` (128): torch's int4 CPU kernel
    ``aten._weight_int4pack_mm_for_cpu``, which computes ``(q - 8) * scale + zero`` (checked at run
    time by ``int4pack_layout.mm_semantics_ok``; group sizes 32..256, N a multiple of 16: rows are
    padded to 64). Its packed byte layout differs per CPU ISA (64-row blocks on AVX512, 32 on AVX2),
    so ``int4pack_layout.layout_for`` derives it by probing the packing op, never assuming it. It only takes bf16
    scales with bf16 activations, so scales/zeros are rounded to bf16 (<= 2^-9 relative per group,
    the size of the bf16 rounding of the output, and of a bf16 dense weight).
  - bfloat16 at M >= 128, and float32 at any M: chunks of rows are expanded to float32 (in-place
    float32 ops are ~6x faster than bf16 ones on CPU), folded back from the planes to [rows, K], cast
    to ``dtype`` and multiplied with F.linear. float32 is exact (a few ulp from the zero = offset +
    8 * scale step) but slow (1536x576 Q4_1 at M = 1: 0.7 ms, 2.6 ms for two-plane types); the int4
    op's own float32 kernel is as slow, ~20x its bf16 one, so bf16 is the compute dtype for CPU.
- **Other devices** (no device-specific code yet) **or a shape the int4 op rejects**: the raw
  blocks are kept and dequantized in chunks of rows by ``gguf.dequant.dequantize`` + F.linear.
- **F32 / F16 / BF16 stored weights**: held in the compute dtype, oneDNN-prepacked on CPU.

Tolerances against ``dequantize`` + float32 matmul (tests/test_gguf_kernels.py), as max |error| /
max |reference|: float32 1e-5 (measured <= 1e-6); bfloat16 1.5e-2 (measured 1-9e-3, the same as a
dense bf16 layer over the dequantized weight).

Measured (benchmarks/bench_gguf_kernels.py; Zen 4, 2 threads, bf16, ms per call on a 1536x576
weight, 1536x512 for 256-blocks; a shared machine, so +-15%). The int4 op is compute-bound near
30 G weights/s at M = 1, so every type reads ~14 GB/s and the two-plane ones take twice as long as
the 4-bit ones; M = 256 is the expanded path:

| type | M=1 | M=16 | M=256 |
|---|---|---|---|
| Q4_0, Q4_1 | 0.033 | 0.18 | 2.5 |
| Q4_K | 0.033 | 0.17 | 1.8 |
| Q5_0, Q5_1, Q8_0, IQ4_NL (2 planes) | 0.066 | 0.37 | 3.5 |
| Q2_K, Q3_K, Q5_K, Q6_K, IQ4_XS (2 planes / padded) | 0.071 | 0.39 | 2.9 |
| BF16 / F16 stored (oneDNN dense) | 0.042 | 0.10 | 1.1 |

One SmolLM2-135M decode token (M = 1, 30 layers Q4_1 + a Q8_0 49152x576 head, all matmuls):
5.3-5.6 ms with fused qkv / gate-up (~7.0 ms separate) holding 102 MB, against 5.5-6.0 ms
(~7.3 ms) and 269 MB for oneDNN-prepacked bf16: the same speed or a little better in 2.6x less
memory. Prefill-sized M is ~2x slower than dense bf16 (the expansion costs ~1 ns a weight).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

import gguf
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from mistralpy.layers.matmul import can_prepack, is_prepacked, linear, prepack, unpacked
from mistralpy.quant.gguf import kernels_cpu as gguf_kernels_cpu
from mistralpy.quant.gguf.dequant import BLOCK_SIZES, dequantize
from mistralpy.quant.gguf.int4pack_layout import PackLayout, layout_for, mm_semantics_ok, pack
from mistralpy.quant.gguf.kernels_cpu import CPU_EXT_TYPES, CpuQMatmulKernel
from mistralpy.quant.gguf.kernels_encode import GROUP, PLANE_TYPES, Planes, encode_planes

__all__ = ["GGUFKernel", "Int4PlaneKernel", "chunk_rows", "dequantize_kernel_weight", "make_gguf_kernel"]

log = logging.getLogger(__name__)

_FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
_PACK_ROWS = 64          # the CPU int4 layout packs rows in blocks of 64
_ENCODE_ROWS = 4096      # rows re-encoded at once: bounds the int32 temporaries of the packing op
_CHUNK_ELEMS = 1 << 22   # weights expanded to float at once in the chunked paths (16 MB in f32)
_DENSE_MIN_ROWS = 128    # from this many input rows the bf16 path expands chunks (measured crossover)


class GGUFKernel(Protocol):
    qtype: gguf.GGMLQuantizationType
    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def nbytes(self) -> int: ...


def _tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def chunk_rows(k: int, align: int = 1) -> int:
    rows = max(align, _CHUNK_ELEMS // max(k, 1))
    return rows - rows % align


class Int4PlaneKernel:
    """CPU: exact int4 planes run by aten._weight_int4pack_mm_for_cpu (bf16) or expanded (f32)."""

    def __init__(self, planes: Iterable[Planes], qtype, out_features: int, in_features: int, dtype: torch.dtype,
                 group: int = GROUP):
        """`planes`: the weight's int4 planes in consecutive chunks of rows (each a multiple of 64 rows
        but the last); `group`: values per scale/zero group (32 for GGUF, 64 for HQQ)."""
        self.qtype, self.out_features, self.in_features, self.dtype = qtype, out_features, in_features, dtype
        self.group = group
        self.padded = -(-out_features // _PACK_ROWS) * _PACK_ROWS
        packs, szs = [], []
        self.fold = None
        layout: PackLayout | None = None
        for p in planes:
            nib, sz = p.nib, torch.stack((p.scale, p.zero), dim=-1)
            if layout is None:   # checked before any packing work
                layout = self._checked_layout(nib.shape[1], group, dtype)
            short = (-nib.shape[0]) % _PACK_ROWS  # only the last chunk can be short
            if short:
                nib = F.pad(nib, (0, 0, 0, short), value=8)
                sz = F.pad(sz, (0, 0, 0, 0, 0, short))
            packs.append(pack(nib))                                      # the op the layout was derived from
            szs.append(sz.to(dtype))
            self.fold = p.fold
        self.packed = torch.cat(packs)                                   # uint8 [N', K'/2]
        assert layout is not None                                        # cat raised on no planes
        self.layout = layout
        self.sz = torch.cat(szs).transpose(0, 1).contiguous()            # [K'/group, N', 2]
        self.k_ext = self.packed.shape[1] * 2
        # The common decode call (2-D contiguous bf16, few rows) skips the general checks.
        self._int4_rows = _DENSE_MIN_ROWS if dtype == torch.bfloat16 else 0
        hi = self.fold[2] if self.fold is not None else 0.0
        self._hi_mult = torch.tensor([1.0, hi], dtype=dtype).reshape(1, 1, 2, 1)

    @staticmethod
    def _checked_layout(k_ext: int, group: int, dtype: torch.dtype) -> PackLayout:
        """The packed layout for K' (the byte order differs per ISA), or RuntimeError: callers then
        fall back to a dequantizing kernel."""
        layout = layout_for(k_ext)
        if layout is None:
            raise RuntimeError(f"torch's int4 packing for K'={k_ext} is not a per-64-row permutation "
                               "this kernel can unpack (int4pack_layout)")
        # Only bf16 kernels call the int4 mm; float32 ones expand the planes.
        if dtype == torch.bfloat16 and not mm_semantics_ok(group):
            raise RuntimeError(f"torch's int4 mm (group {group}) does not compute (q - 8) * scale + zero")
        return layout

    @classmethod
    def from_gguf(cls, raw: torch.Tensor, qtype: Q, out_features: int, in_features: int,
                  dtype: torch.dtype) -> Int4PlaneKernel:
        chunks = (encode_planes(raw[s:s + _ENCODE_ROWS], qtype, in_features)
                  for s in range(0, out_features, _ENCODE_ROWS))
        return cls(chunks, qtype, out_features, in_features, dtype)

    def nbytes(self) -> int:
        return _tensor_bytes(self.packed, self.sz)

    def _extend(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x' [M, K'] read by the planes: Planes.idx / Planes.mult as one cheap op."""
        if self.fold is None:
            return x
        h, _, hi = self.fold
        m = x.shape[0]
        xs = x.reshape(m, -1, 1, h)
        if hi == 0.0:      # padded sub-blocks: a zero column after each
            return F.pad(xs, (0, h)).reshape(m, self.k_ext)
        if hi == 1.0:      # low and high plane read the same values (cat: the cheapest single op)
            return torch.cat((xs, xs), dim=2).reshape(m, self.k_ext)
        return (xs * self._hi_mult).reshape(m, self.k_ext)   # [x, hi * x] in one broadcast op

    def expand(self, start: int, stop: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows [start, stop) (multiples of 64) of W [rows, K] in `dtype`, planes folded back."""
        rows = stop - start
        q = self.layout.unpack(self.packed[start:stop]).reshape(rows, -1, self.group)   # uint8 nibbles
        sz = self.sz[:, start:stop].float()                                   # [K'/32, rows, 2]
        # float32 in place: several times faster than bf16 elementwise ops on CPU.
        w = q.to(torch.float32).sub_(8).mul_(sz[..., 0].t().unsqueeze(-1)).add_(sz[..., 1].t().unsqueeze(-1))
        if self.fold is not None:
            h, _, hi = self.fold
            w = w.reshape(rows, -1, 2, h)
            if hi:
                w[:, :, 0].add_(w[:, :, 1], alpha=hi)
            w = w[:, :, 0]
        # The cast gathers a folded (strided) view into a contiguous [rows, K].
        return w.to(dtype).reshape(rows, self.in_features)

    def _expanded_matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], self.padded, dtype=x.dtype)
        step = chunk_rows(self.k_ext, _PACK_ROWS)
        for start in range(0, self.padded, step):
            stop = min(start + step, self.padded)
            out[:, start:stop] = F.linear(x, self.expand(start, stop, self.dtype))
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] < self._int4_rows and x.dtype == torch.bfloat16 and x.is_contiguous() \
                and x.shape[0] > 0:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._extend(x), self.packed, self.group, self.sz)
            return y if self.padded == self.out_features else y[:, :self.out_features].contiguous()
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        if x2.shape[0] == 0:
            y = x2.new_empty(0, self.padded)
        elif self.dtype == torch.bfloat16 and x2.shape[0] < _DENSE_MIN_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(self._extend(x2), self.packed, self.group, self.sz)
        else:
            y = self._expanded_matmul(x2)
        if self.padded != self.out_features:
            y = y[:, :self.out_features].contiguous()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """W [N, K] in float32, as the expanded path multiplies by it."""
        step = chunk_rows(self.k_ext, _PACK_ROWS)
        w = torch.cat([self.expand(s, min(s + step, self.padded)) for s in range(0, self.padded, step)])
        return w[:self.out_features]


class RawDequantKernel:
    """Any device: raw blocks kept, dequantized in chunks of rows, then F.linear in `dtype`."""

    def __init__(self, raw: torch.Tensor, qtype: Q, out_features: int, in_features: int, dtype: torch.dtype):
        self.qtype, self.out_features, self.in_features, self.dtype = qtype, out_features, in_features, dtype
        self.raw = raw.contiguous()

    def nbytes(self) -> int:
        return _tensor_bytes(self.raw)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return dequantize(self.raw[start:stop], self.qtype, (stop - start, self.in_features))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        step = chunk_rows(self.in_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            out[:, start:stop] = F.linear(x2, self.rows(start, stop).to(x.dtype))
        return out.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, (self.out_features, self.in_features))


class FloatKernel:
    """F32/F16/BF16 stored weights: held in the compute dtype, oneDNN-prepacked where possible."""

    def __init__(self, raw: torch.Tensor, qtype: Q, out_features: int, in_features: int, dtype: torch.dtype,
                 device: torch.device):
        self.qtype, self.out_features, self.in_features, self.dtype = qtype, out_features, in_features, dtype
        w = dequantize(raw.to(device), qtype, (out_features, in_features)).to(dtype)
        self.weight = prepack(w) if can_prepack(w) else w

    def nbytes(self) -> int:
        if is_prepacked(self.weight):
            return self.out_features * self.in_features * self.weight.element_size()
        return _tensor_bytes(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = linear(x.reshape(-1, self.in_features), self.weight)
        return y.reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        return unpacked(self.weight).float()


def _int4_ok(qtype: Q, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    return (device.type == "cpu" and qtype in PLANE_TYPES and dtype in (torch.bfloat16, torch.float32)
            and in_features % GROUP == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"))


def _cpu_ext_ok(qtype: Q, in_features: int, dtype: torch.dtype, device: torch.device) -> bool:
    # bf16 only: the int8 activations err like bf16 rounding does, not within float32's tolerance.
    return (device.type == "cpu" and dtype == torch.bfloat16 and qtype in CPU_EXT_TYPES
            and in_features % GROUP == 0 and gguf_kernels_cpu.fast())


_warned: set[str] = set()   # each distinct int4 refusal is logged once, not per tensor


def make_gguf_kernel(raw: torch.Tensor, qtype: Q, out_features: int, in_features: int, *,
                     dtype: torch.dtype, device: torch.device) -> GGUFKernel:
    """A matmul over raw GGUF rows: raw uint8 [out_features, row_bytes] -> kernel(x [M, in]) -> [M, out]."""
    qtype, device = Q(qtype), torch.device(device)
    if qtype not in BLOCK_SIZES:
        raise NotImplementedError(f"GGUF type {qtype.name} has no matmul kernel")
    bs, ts = BLOCK_SIZES[qtype]
    if in_features % bs or raw.dtype != torch.uint8 or raw.numel() != out_features * in_features // bs * ts:
        raise ValueError(f"{qtype.name} weight [{out_features}, {in_features}] does not match raw "
                         f"{raw.dtype} {tuple(raw.shape)}")
    raw = raw.reshape(out_features, -1)
    if qtype in _FLOAT_TYPES:
        return FloatKernel(raw, qtype, out_features, in_features, dtype, device)
    if _cpu_ext_ok(qtype, in_features, dtype, device):
        return CpuQMatmulKernel(raw.cpu(), qtype, out_features, in_features, dtype)
    if _int4_ok(qtype, in_features, dtype, device):
        try:
            return Int4PlaneKernel.from_gguf(raw.cpu(), qtype, out_features, in_features, dtype)
        except RuntimeError as exc:  # a torch build whose int4 op rejects the shape or layout: stay generic
            if str(exc) not in _warned:
                _warned.add(str(exc))
                log.warning("int4 kernel unavailable for %s [%d, %d]: %s", qtype.name, out_features, in_features, exc)
    return RawDequantKernel(raw.to(device), qtype, out_features, in_features, dtype)


def dequantize_kernel_weight(k: GGUFKernel) -> torch.Tensor:
    """The float32 weight [out, in] a kernel multiplies by (after its own roundings), for tests/debug."""
    return k.dequantized()  # type: ignore[attr-defined]
