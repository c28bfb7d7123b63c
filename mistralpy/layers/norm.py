"""Normalisation layers, numerically as in HF (statistics in float32, cast back)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers import cpu_fused


class RMSNorm(nn.Module):
    """x / rms(x) * w. ``offset=1`` gives Gemma's (1 + w) form."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        w = self.weight
        if cpu_fused.usable(x) and w.device.type == "cpu" and (self.offset or w.dtype == dtype):
            return cpu_fused.rms_norm(x, w, self.eps, self.offset)  # one op instead of 6-7
        if dtype == torch.float32 and not self.offset:
            # One op instead of six (bitwise equal to the form below in float32).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # HF's x * rsqrt(mean(x^2) + eps) in float32, in place where possible: ~7 us less than
        # F.rms_norm on a decode row (its CPU kernel runs several more ops), bitwise equal.
        h = x.float()
        h = h * h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(dtype)
        return self.weight * h.to(dtype)


class LayerNorm(nn.Module):
    """(x - mean(x)) / std(x) * w + b, exactly torch.nn.LayerNorm (Phi-2, StarCoder2)."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden_size), requires_grad=False) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
