"""Linear layers with weight loaders.

Weights keep HF's [out, in] layout; the product goes through ``layers.matmul.linear`` (the fast
CPU ordering is explained there). Each parameter carries a ``weight_loader(param, hf_tensor,
shard=None)`` so the model's generic loader needs no per-layer knowledge.

``MergedLinear`` fuses several HF projections (q/k/v, gate/up) into one matmul; each checkpoint
tensor lands in its column range (``stacked_params`` in the model maps the names).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mistralpy.errors import ModelLoadError
from mistralpy.layers.matmul import linear


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
    if param.shape != loaded.shape:
        raise ModelLoadError(f"checkpoint shape {tuple(loaded.shape)} does not match the model's {tuple(param.shape)}")
    param.data.copy_(loaded)


def _param(*shape: int, loader=default_weight_loader) -> nn.Parameter:
    # torch.empty does not touch memory: weights are written exactly once, by the loader.
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = loader
    return p


class Linear(nn.Module):
    """y = x W^T + b with W [out, in] as stored by HF."""

    prepackable = True  # the weight may be swapped for a oneDNN-packed one after loading

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(out_features, in_features, loader=self._load_weight)
        self.bias = _param(out_features) if bias else None

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        if loaded.shape != (self.out_features, self.in_features):
            raise ModelLoadError(f"checkpoint shape {tuple(loaded.shape)} does not match "
                                 f"[{self.out_features}, {self.in_features}]")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dim."""

    def __init__(self, in_features: int, shard_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes), bias)
        self.shard_sizes = list(shard_sizes)
        self.shard_offsets = [sum(self.shard_sizes[:i]) for i in range(len(self.shard_sizes))]
        if self.bias is not None:
            self.bias.weight_loader = self._load_bias

    def _shard_range(self, loaded: torch.Tensor, shard: int | None) -> tuple[int, int]:
        if shard is None:
            raise ModelLoadError("a fused projection needs its shard index")
        start, size = self.shard_offsets[shard], self.shard_sizes[shard]
        if loaded.shape[0] != size:
            raise ModelLoadError(f"shard {shard} expects {size} rows, got {tuple(loaded.shape)}")
        return start, size

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        start, size = self._shard_range(loaded, shard)
        if loaded.shape[1] != self.in_features:
            raise ModelLoadError(f"shard {shard} expects {self.in_features} columns, got {tuple(loaded.shape)}")
        param.data[start:start + size].copy_(loaded)

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard: int | None = None) -> None:
        start, size = self._shard_range(loaded, shard)
        param.data[start:start + size].copy_(loaded)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(y.split(self.shard_sizes, dim=-1))
