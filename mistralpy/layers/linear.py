"""Linear layers with weight loaders.

``MergedLinear`` fuses several HF projections (q/k/v, gate/up) into one matmul; each checkpoint
tensor is copied into its row range by ``load_shard``. Keeping the HF shard names in the model's
``stacked_params`` table makes the mapping explicit.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _empty(*shape: int) -> nn.Parameter:
    # torch.empty does not touch memory: weights are written exactly once, by the loader.
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b with W [out, in] as stored by HF."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _empty(out_features, in_features)
        self.bias = _empty(out_features) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim."""

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes), bias)
        self.shard_sizes = list(shard_sizes)
        self.shard_offsets = [sum(self.shard_sizes[:i]) for i in range(len(self.shard_sizes))]

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard: int) -> None:
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard} expects {size} rows, got {tuple(loaded.shape)}")
        param.data[start:start + size].copy_(loaded)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.shard_sizes, dim=-1))
