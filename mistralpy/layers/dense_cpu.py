"""Dense bf16 products through the C++ extension (``kernels/cpu/dense.cpp``) on CPU.

Weights are re-laid once after loading into "pair tiles" ([N/16, K/2, 16, 2], see dense.cpp), the
layout the AVX512-BF16 dot-product instruction reads directly (the AVX2 path widens it to float32
in registers). Measured on a Zen 4 (2 threads,
SmolLM2-135M's 120 layer weights, cycled so they come from memory): one decode row ~7 ms against
oneDNN's prepacked 11 ms (30 against 19 GB/s), 16 rows 12.5 ms against 14.5 or more, prefill
sizes about equal (256 rows: both near the bf16 dot-product peak). A packed weight is a 4-D bf16 tensor; ``layers.matmul.linear`` knows it.
"""
from __future__ import annotations

import torch

TILE = 16
_state: dict[str, bool] = {}
_op: list = []   # the chosen variant's dense_mm, looked up once


def available() -> bool:
    """True when the loaded extension has a SIMD path (AVX512-BF16 or AVX2), not its slow portable one."""
    if "ok" not in _state:
        from mistralpy.kernels import cpu as cpu_ext

        ok = cpu_ext.load()
        if ok:
            ok = cpu_ext.isa(op="dense_isa") in ("avx512bf16", "avx2")
            cpu_ext.register_fakes(_register_fake)
            _op.append(cpu_ext.ops().dense_mm.default)
        _state["ok"] = ok
    return _state["ok"]


def _register_fake(namespace: str) -> None:
    @torch.library.register_fake(f"{namespace}::dense_mm")
    def _(x, w, n, bias):
        return x.new_empty(x.shape[0], n)


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[0] % TILE == 0 and weight.shape[1] % 2 == 0 and available())


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() == 4


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 (N a multiple of 16, K even) -> [N/16, K/2, 16, 2]."""
    n, k = weight.shape
    return weight.detach().reshape(n // TILE, TILE, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    nt, kp = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(nt * TILE, kp * 2)


def out_features(packed: torch.Tensor) -> int:
    return packed.shape[0] * TILE


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] bf16 @ the packed weight^T (+ bias) -> [..., N] bf16."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = out_features(packed)
    y = _op[0](x.reshape(-1, k).contiguous(), packed, n, bias)
    return y.view(*lead, n)
