"""HQQ (half-quadratic quantization, mobiusml/hqq) for ISQ: the HQQ4 and HQQ8 types of mistral.rs.

Each group of 64 consecutive input features of a weight row gets an asymmetric 4- or 8-bit grid:
``w ~ (q - zero) * scale`` with q in [0, 2^bits - 1]. The scale comes from the group's min/max;
the zero point is then refined by HQQ's half-quadratic solver (``optimize_weights_proximal_legacy``
in hqq and in mistral.rs): alternate rounding with the current zero, an lp-norm (p = 0.7) shrinkage
of the residual ``W_e = shrink(W - W_r)``, and the closed-form zero ``mean(W_q - (W - W_e) / scale)``,
beta growing by kappa each step. Parameters are mistral.rs's ISQ defaults (lp 0.7, beta 10,
kappa 1.01, 10 steps). Two changes, both only ever lowering the error: each group keeps the zero
with its lowest mean |error| among the steps tried (min/max's own included: never worse than plain
rounding), where hqq stops all groups at the first step whose global error rises; and groups run
along the input dimension (hqq's axis=1, the layout its fast kernels use), where mistral.rs's ISQ
reshapes to [64, -1] (axis 0, strided groups). Scale and zero are float32 here (hqq keeps them in
the model dtype); the kernel rounds them to its compute dtype.

Kernels (``HQQWeight.make_kernel``), no float copy of the weight kept:

- CPU, bfloat16 / float32: the groups map exactly onto torch's int4 matmul
  (``aten._weight_int4pack_mm_for_cpu``, which computes ``(nib - 8) * s + z`` per group of 64) through
  ``gguf.kernels.Int4PlaneKernel``: HQQ4 is one plane, ``z = (8 - zero) * scale``; HQQ8 splits
  ``q = 16 hi + lo`` into two planes (scales s and 16 s, ``z = (136 - zero) * s`` on the low one),
  as Q8_0 does. Bytes held per weight in bf16: HQQ4 0.5 + 0.0625, HQQ8 1 + 0.125. bf16 below 128
  rows runs the int4 op; float32, and bf16 from 128 rows, expand chunks of rows to float.
- Other devices / dtypes: the packed integers are kept and dequantized in chunks of rows + F.linear.

Widths that are not a multiple of 64 are not HQQ-able: ``isq.quantize_tensor`` falls back (see there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GROUP", "HQQWeight", "minmax_hqq", "quantize_hqq"]

GROUP = 64
LP_NORM, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 10
_CHUNK_VALUES = 1 << 18   # float values quantized at once (bounds the solver's temporaries)
_MAX_INV_SCALE = 2e4      # hqq's clamp of 1 / scale (constant groups)


@dataclass(slots=True)
class HQQWeight:
    """A weight [N, K] as HQQ groups: w[n, k] ~ (q[n, k] - zero[n, k // 64]) * scale[n, k // 64]."""

    bits: int                 # 4 or 8
    q: torch.Tensor           # uint8 [N, K] (8-bit) or [N, K/2] (4-bit: value 2j in the low nibble)
    scale: torch.Tensor       # float32 [N, K/64]
    zero: torch.Tensor        # float32 [N, K/64], in units of q (not rounded)
    shape: tuple[int, int]
    qtype: Any = None         # the ISQ type (isq.IsqType.HQQ4 / HQQ8) kernels report

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero))

    def ints(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """q of rows [start, stop) as uint8 [rows, K]."""
        q = self.q[start:stop]
        if self.bits == 8:
            return q
        return torch.stack((q & 0x0F, q >> 4), dim=-1).reshape(q.shape[0], -1)

    def dequantize(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) in float32 [rows, K]: (q - zero) * scale."""
        q = self.ints(start, stop).to(torch.float32)
        rows = q.shape[0]
        q = q.reshape(rows, -1, GROUP)
        w = (q - self.zero[start:stop].unsqueeze(-1)) * self.scale[start:stop].unsqueeze(-1)
        return w.reshape(rows, self.shape[1])

    @classmethod
    def cat(cls, parts: list[HQQWeight]) -> HQQWeight:
        """Row-wise join (merged projections): rows are independent."""
        bits = {p.bits for p in parts}
        if len(bits) != 1 or len({p.shape[1] for p in parts}) != 1:
            raise ValueError("HQQ parts differ in bits or width")
        return cls(parts[0].bits, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                   torch.cat([p.zero for p in parts]), (sum(p.shape[0] for p in parts), parts[0].shape[1]),
                   parts[0].qtype)

    def make_kernel(self, dtype: torch.dtype, device: torch.device):
        """A matmul x [..., K] -> [..., N] over these groups, computing in `dtype` (module docstring)."""
        from mistralpy.quant.gguf import kernels as gk

        device = torch.device(device)
        n, k = self.shape
        if device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) \
                and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            chunks = (self._planes(s, min(s + 4096, n)) for s in range(0, n, 4096))
            try:
                return gk.Int4PlaneKernel(chunks, self.qtype, n, k, dtype, group=GROUP)
            except RuntimeError:  # a torch build whose int4 op rejects the shape: stay generic
                pass
        return HQQDequantKernel(self, dtype, device)

    def _planes(self, start: int, stop: int):
        """The exact int4 planes of rows [start, stop) (gguf_kernels_encode.Planes)."""
        from mistralpy.quant.gguf.kernels_encode import Planes

        q = self.ints(start, stop)
        s, z = self.scale[start:stop], self.zero[start:stop]
        rows, g = s.shape
        if self.bits == 4:
            return Planes(q, s, (8 - z) * s, None, None, None)
        q = q.reshape(rows, g, 1, GROUP)
        nib = torch.cat((q & 0x0F, q >> 4), dim=2).reshape(rows, 2 * g * GROUP)
        scale = torch.stack((s, 16 * s), dim=2).reshape(rows, 2 * g)
        zero = torch.stack(((136 - z) * s, torch.zeros_like(s)), dim=2).reshape(rows, 2 * g)
        return Planes(nib, scale, zero, None, None, (GROUP, 1.0, 1.0))


class HQQDequantKernel:
    """Any device: packed ints kept, chunks of rows dequantized, then F.linear in `dtype`."""

    def __init__(self, w: HQQWeight, dtype: torch.dtype, device: torch.device) -> None:
        self.w = HQQWeight(w.bits, w.q.to(device), w.scale.to(device), w.zero.to(device), w.shape, w.qtype)
        self.qtype, self.dtype = w.qtype, dtype
        self.out_features, self.in_features = w.shape

    def nbytes(self) -> int:
        return self.w.nbytes()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from mistralpy.quant.gguf.kernels import chunk_rows

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype)
        out = torch.empty(x2.shape[0], self.out_features, dtype=self.dtype, device=x.device)
        step = chunk_rows(self.in_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            out[:, start:stop] = F.linear(x2, self.w.dequantize(start, stop).to(self.dtype))
        return out.to(x.dtype).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.w.dequantize()


# ------------------------------------------------------------------------------------ quantizer
def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """hqq's generalized soft threshold for the lp norm (p < 1)."""
    a = x.abs()
    return torch.sign(x) * F.relu(a - (1.0 / beta) * torch.pow(a + 1e-8, p - 1))


def _groups(w: torch.Tensor, bits: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w float32 [G, 64] -> (q uint8 [G, 64], scale, zero float32 [G])."""
    max_v = float(2 ** bits - 1)
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    inv = (max_v / (hi - lo)).clamp_(max=_MAX_INV_SCALE)   # 1 / scale, as hqq (inf -> clamp)
    zero = -lo * inv
    best_zero, best_err = zero, None
    beta = BETA
    for step in range(iters + 1):
        wq = (w * inv + zero).round_().clamp_(0, max_v)
        err_w = w - (wq - zero) / inv
        err = err_w.abs().mean(dim=1, keepdim=True)
        if best_err is None:
            best_err = err
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_zero = torch.where(better, zero, best_zero)
        if step == iters:
            break
        we = _shrink(err_w, beta, LP_NORM)
        zero = (wq - (w - we) * inv).mean(dim=1, keepdim=True)
        beta *= KAPPA
    q = (w * inv + best_zero).round_().clamp_(0, max_v).to(torch.uint8)
    return q, (1 / inv).squeeze(1), best_zero.squeeze(1)


def quantize_hqq(weight: torch.Tensor, bits: int, *, iters: int = ITERS, qtype: Any = None) -> HQQWeight:
    """Float [N, K] weight (K a multiple of 64) -> HQQWeight with `bits` (4 or 8) per value.

    `iters` = 0 is plain min/max rounding (the solver's starting point)."""
    if bits not in (4, 8):
        raise ValueError(f"HQQ supports 4 or 8 bits here, not {bits}")
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight, got {tuple(weight.shape)} {weight.dtype}")
    n, k = weight.shape
    if k % GROUP:
        raise ValueError(f"HQQ needs rows that are a multiple of {GROUP} values, got {k}")
    g = k // GROUP
    q = torch.empty(n, k if bits == 8 else k // 2, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(n, g, dtype=torch.float32, device=weight.device)
    zero = torch.empty_like(scale)
    step = max(1, _CHUNK_VALUES // k)
    for start in range(0, n, step):
        stop = min(start + step, n)
        w = weight[start:stop].to(torch.float32).reshape(-1, GROUP)
        qi, s, z = _groups(w, bits, iters)
        qi = qi.reshape(stop - start, k)
        q[start:stop] = qi if bits == 8 else qi[:, 0::2] | (qi[:, 1::2] << 4)
        scale[start:stop], zero[start:stop] = s.reshape(-1, g), z.reshape(-1, g)
    return HQQWeight(bits, q, scale, zero, (n, k), qtype)


def minmax_hqq(weight: torch.Tensor, bits: int) -> HQQWeight:
    """The same grid without the solver (plain min/max rounding): the baseline HQQ improves on."""
    return quantize_hqq(weight, bits, iters=0)
