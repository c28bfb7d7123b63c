"""FP8 (E4M3) weights for ISQ: mistral.rs's FP8 / F8E4M3 type.

Storage: one ``torch.float8_e4m3fn`` byte per weight plus one float32 scale per output row
(per-channel): ``w[n, k] ~ q[n, k] * scale[n]`` with ``scale = max |w[n]| / 448`` (448 is E4M3's
largest finite value; the cast rounds to nearest even). mistral.rs scales per tensor; per row costs
4 bytes a row and keeps a row of small weights from sharing an outlier row's range.

Kernel (``FP8Weight.make_kernel``), no float copy of the weight kept: chunks of rows are expanded
and multiplied with F.linear, the row scales applied to the output columns. torch's own E4M3 -> float
cast is slow on CPU (~3.5 ms for 1536x576), so on CPU the bytes are turned into float16 *bit
patterns* instead: an E4M3 byte ``s eeee mmm`` placed as ``s 0eeee mmm0000000`` is the float16 of
the same value times 2^-8, subnormals included (both formats' subnormals scale the same way), so
``int8 -> int16, << 7, clear bit 14`` (the sign extension) is exact; the 2^8 goes into the scales.
The float16 chunk is widened to float32 (fast, exact) and multiplied in float32; bf16 inputs below
16 rows are widened too (as fast at decode sizes), from 16 rows the chunk is cast on to bf16 (still
exact: 4 significant bits) and multiplied in bf16, ~2x faster at prefill sizes. Other devices use
``q.to(dtype)`` (fast there); ``torch._scaled_mm`` (fp8 tensor cores) is not used yet.

Measured on a shared 2-core Zen 4, one thread, bf16, 1536x576: 0.27 ms at M = 1 (bf16 dense 0.045,
HQQ4 0.050), 0.5 at M = 16, 2.5 at M = 256 (dense 2.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FP8_MAX", "FP8Weight", "quantize_fp8"]

FP8_MAX = 448.0
_CHUNK_VALUES = 1 << 20
_BF16_MIN_ROWS = 16   # from this many rows a bf16 product beats the float32 one (measured, 1536x576)


@dataclass(slots=True)
class FP8Weight:
    """A weight [N, K] as E4M3 values and per-row scales: w = q * scale."""

    q: torch.Tensor        # float8_e4m3fn [N, K]
    scale: torch.Tensor    # float32 [N]
    shape: tuple[int, int]
    qtype: Any = None      # the ISQ type (isq.IsqType.FP8) kernels report

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) in float32."""
        return self.q[start:stop].to(torch.float32) * self.scale[start:stop].unsqueeze(1)

    @classmethod
    def cat(cls, parts: list[FP8Weight]) -> FP8Weight:
        """Row-wise join (merged projections)."""
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("FP8 parts differ in width")
        return cls(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                   (sum(p.shape[0] for p in parts), parts[0].shape[1]), parts[0].qtype)

    def make_kernel(self, dtype: torch.dtype, device: torch.device) -> FP8Kernel:
        return FP8Kernel(self, dtype, torch.device(device))


def quantize_fp8(weight: torch.Tensor, *, qtype: Any = None) -> FP8Weight:
    """Float [N, K] weight -> FP8Weight (per-row scales; an all-zero row gets scale 1)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    step = max(1, _CHUNK_VALUES // max(k, 1))
    for start in range(0, n, step):
        w = weight[start:start + step].to(torch.float32)
        amax = w.abs().amax(dim=1)
        s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        q[start:start + step] = (w / s.unsqueeze(1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        scale[start:start + step] = s
    return FP8Weight(q, scale, (n, k), qtype)


def e4m3_as_f16_bits(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [..] -> float16 holding exactly q * 2^-8 (see the module docstring)."""
    v = q.view(torch.int8).to(torch.int16)
    v.bitwise_left_shift_(7).bitwise_and_(-16385)   # clear bit 14 (0x4000), set by sign extension
    return v.view(torch.float16)


class FP8Kernel:
    """x [..., K] -> [..., N]: chunks of rows expanded (exactly) and multiplied, scales on the output."""

    def __init__(self, w: FP8Weight, dtype: torch.dtype, device: torch.device) -> None:
        self.qtype, self.dtype = w.qtype, dtype
        self.out_features, self.in_features = w.shape
        self.q = w.q.to(device)
        self.bits = device.type == "cpu"   # the float16 bit-pattern expansion (CPU)
        # Output scales (float32): the bit patterns carry 2^-8.
        self.out_scale = (w.scale * (256.0 if self.bits else 1.0)).to(device)
        self.compute = torch.float32 if self.bits or dtype == torch.float32 else dtype

    def nbytes(self) -> int:
        return self.q.numel() + self.out_scale.numel() * 4

    def _rows(self, start: int, stop: int, compute: torch.dtype | None = None) -> torch.Tensor:
        q, compute = self.q[start:stop], compute or self.compute
        if not self.bits:
            return q.to(compute)
        w = e4m3_as_f16_bits(q).to(torch.float32)   # float16 -> bfloat16 directly is ~6x slower
        return w if compute == torch.float32 else w.to(compute)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from mistralpy.quant.gguf.kernels import chunk_rows

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        compute = self.compute
        if self.bits and self.dtype == torch.bfloat16 and x2.shape[0] >= _BF16_MIN_ROWS:
            compute = torch.bfloat16   # exact too: E4M3 * 2^-8 has 4 significant bits
        x2 = x2.to(compute)
        out = torch.empty(x2.shape[0], self.out_features, dtype=compute, device=x.device)
        step = chunk_rows(self.in_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            out[:, start:stop] = F.linear(x2, self._rows(start, stop, compute))
        y = out.to(torch.float32).mul_(self.out_scale) if compute != torch.float32 else out.mul_(self.out_scale)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """W [N, K] in float32, as the kernel multiplies by it."""
        scale = self.out_scale.unsqueeze(1)
        return torch.cat([self._rows(s, min(s + 4096, self.out_features)).float()
                          for s in range(0, self.out_features, 4096)]) * scale
