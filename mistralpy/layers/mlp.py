"""The gated MLP most families share: down(act(gate(x)) * up(x)), gate and up fused into one matmul."""
from __future__ import annotations

import torch
from torch import nn

from mistralpy.layers.activation import act_and_mul, get_act_fn
from mistralpy.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    """x [T, hidden] -> [T, hidden]. Checkpoints' gate_proj / up_proj load as the two shards of
    ``gate_up_proj`` (the models' ``stacked_params``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act_fn))
