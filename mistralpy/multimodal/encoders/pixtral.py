"""Pixtral's vision transformer (Mistral 3's tower), parameter names as transformers' PixtralVisionModel.

Patch conv (no bias), ``ln_pre`` RMSNorm, then pre-norm blocks (RMSNorm eps 1e-5, bidirectional
attention with 2-D axial RoPE over (row, column), SiLU-gated FFN). transformers runs several images
as one sequence with a block-diagonal mask; we encode one image per call, which is the same thing.
Checkpoint q/k/v and gate/up projections load as shards of fused layers (``qkv_proj``,
``gate_up_proj``) through the wrapping model's ``stacked_params``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.layers.mlp import GatedMLP
from mistralpy.layers.norm import RMSNorm


def axial_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """transformers' compute_axial_rope_parameters: even-indexed frequencies (rows), then odd (columns)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    return torch.cat([inv[0::2], inv[1::2]])


def axial_cos_sin(rows: int, cols: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [rows * cols, head_dim] for patches in row-major order (PixtralVisionRotaryEmbedding)."""
    h = torch.arange(rows, device=inv_freq.device).repeat_interleave(cols).float()
    w = torch.arange(cols, device=inv_freq.device).repeat(rows).float()
    quarter = inv_freq.shape[0] // 2
    freqs = torch.cat([h[:, None] * inv_freq[None, :quarter], w[:, None] * inv_freq[None, quarter:]], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1)
    return freqs.cos(), freqs.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [H, N, D] * cos + rotate_half(x) * sin, as transformers (cos / sin in x's dtype)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PixtralAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads   # transformers' PixtralAttention ignores head_dim here
        self.qkv_proj = MergedLinear(hidden, [hidden, hidden, hidden], bias=False)
        self.o_proj = Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).view(n, 3, self.num_heads, self.head_dim).permute(1, 2, 0, 3).unbind(0)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]   # [H, N, D], one image
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))


class PixtralAttentionLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.attention_norm = RMSNorm(hidden, eps=1e-5)
        self.attention = PixtralAttention(cfg)
        self.ffn_norm = RMSNorm(hidden, eps=1e-5)
        self.feed_forward = GatedMLP(hidden, cfg["intermediate_size"], cfg.get("hidden_act", "gelu"), bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class PixtralTransformer(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PixtralAttentionLayer(cfg) for _ in range(num_layers))


class PixtralVisionModel(nn.Module):
    """Only the layers up to ``num_layers`` are built (the family's name mapping skips the rest)."""

    def __init__(self, cfg: dict[str, Any], num_layers: int | None = None) -> None:
        super().__init__()
        hidden, self.patch_size = cfg["hidden_size"], cfg["patch_size"]
        self.patch_conv = nn.Conv2d(cfg.get("num_channels", 3), hidden, self.patch_size, self.patch_size, bias=False)
        self.ln_pre = RMSNorm(hidden, eps=1e-5)
        self.transformer = PixtralTransformer(cfg, cfg["num_hidden_layers"] if num_layers is None else num_layers)
        rope = cfg.get("rope_parameters") or {}
        theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
        # kept as a float32 tensor outside the module's state, so a dtype cast of the model leaves it exact
        self._inv_freq = axial_inv_freq(cfg.get("head_dim") or hidden // cfg["num_attention_heads"], theta)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """One image [1, 3, H, W] -> hidden states [rows * cols, hidden] as transformers numbers them:
        [0] after ln_pre, [i] after layer i."""
        dtype = self.patch_conv.weight.dtype
        grid = self.patch_conv(pixel_values.to(dtype))[0]          # [hidden, rows, cols]
        rows, cols = grid.shape[-2:]
        x = self.ln_pre(grid.flatten(1).T.contiguous())
        cos, sin = axial_cos_sin(rows, cols, self._inv_freq.to(x.device))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        states = [x]
        for layer in self.transformer.layers:
            x = layer(x, cos, sin)
            states.append(x)
        return states


def map_pixtral_name(name: str, num_layers: int) -> str | None:
    """A PixtralVisionModel checkpoint name (below the tower's prefix) -> ours; None for layers past
    the selected one. q/k/v and gate/up keep their names: the model's stacked_params fuse them."""
    if ".layers." in name:
        idx = int(name.split(".layers.")[1].split(".")[0])
        if idx >= num_layers:
            return None
    return name
