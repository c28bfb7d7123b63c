"""The dense matmul every linear layer and the LM head go through.

Weights keep HF's [out, in] layout and are applied as ``(W @ x^T)^T`` rather than ``x @ W^T``
(F.linear). On CPUs with MKL this ordering is markedly faster for the small row counts of
decoding: measured on this project's 2-core CI machine with 30 SmolLM2-135M layers streamed from
memory (f32), 16 GB/s at 2 rows against 7 with F.linear, 14 against 7 at 4 rows, 7.3 against 6.4
at 16; whole decode steps 20% (batch 1) to 25% (batch 16) faster. A single row is duplicated to
two because MKL's one-row path is the slow one. The result is a transposed view; making it
contiguous costs more than it saves downstream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight[out, in]^T (+ bias) -> [M, out]."""
    if x.device.type != "cpu" or x.dim() != 2:
        return F.linear(x, weight, bias)
    if x.shape[0] == 1:
        y = (weight @ x.repeat(2, 1).t())[:, :1].t()
    else:
        y = (weight @ x.t()).t()
    return y + bias if bias is not None else y
