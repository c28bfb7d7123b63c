"""Gated activations on fused [gate | up] projections."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_FNS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_act_fn(name: str):
    try:
        return ACT_FNS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}") from None


def act_and_mul(gate_up: torch.Tensor, act) -> torch.Tensor:
    """gate_up [..., 2I] -> act(gate) * up  [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
