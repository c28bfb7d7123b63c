"""Llama 4's vision tower (transformers' ``Llama4VisionModel``), parameter names as transformers'.

Per tile [3, S, S]: patches cut by an unfold (channel-major, then the patch's rows, columns) and
projected by ``patch_embedding.linear`` (no bias); a class embedding is appended *after* the
patches, learned positions added, ``layernorm_pre``; pre-LayerNorm blocks with bidirectional
attention whose q/k take a 2-D RoPE on interleaved (complex) pairs (the first quarter of the pairs
turn with the patch's column + 1, the second with its row + 1; the class token does not turn);
``layernorm_post``, the class token dropped, then the vision adapter: pixel shuffle (ratio 0.5:
2x2 patches -> one row of 4x channels) and a GELU MLP (fc1, GELU, fc2, GELU; no biases).
Every tile (the grid's and the global one) runs the same way; tiles are a batch.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.layers.norm import LayerNorm


def vision_rope(cfg: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [N + 1, head_dim / 2] (float32) for the tile's N patches (row-major) + the class token."""
    side = cfg["image_size"] // cfg["patch_size"]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0)
    freq_dim = head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, freq_dim, 2)[: freq_dim // 2].float() / freq_dim))
    n = torch.arange(side * side)
    col, row = (n % side + 1).float(), (n // side + 1).float()
    angles = torch.cat([col[:, None] * inv[None, :], row[:, None] * inv[None, :]], dim=-1)
    angles = torch.cat([angles, torch.zeros(1, angles.shape[1])])         # the class token: angle 0
    return angles.cos(), angles.sin()


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, N, H, D] with (x[2i], x[2i+1]) as complex numbers times e^{i angle}; float32 math."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2).to(x.dtype)


class Llama4VisionAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = MergedLinear(hidden, [hidden, hidden, hidden], bias=True)
        self.o_proj = Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv_proj(x.reshape(b * n, d)).view(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        q, k = _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o_proj(out.transpose(1, 2).reshape(b * n, d)).view(b, n, d)


class Llama4VisionMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=True)
        self.fc2 = Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        return self.fc2(F.gelu(self.fc1(x.reshape(-1, shape[-1])))).view(shape)


class Llama4VisionEncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.self_attn = Llama4VisionAttention(cfg)
        self.mlp = Llama4VisionMLP(cfg)
        self.input_layernorm = LayerNorm(hidden, 1e-5)   # nn.LayerNorm defaults in transformers
        self.post_attention_layernorm = LayerNorm(hidden, 1e-5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama4VisionEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Llama4VisionEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class Llama4UnfoldConvolution(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.patch_size = cfg["patch_size"]
        self.linear = Linear(cfg.get("num_channels", 3) * self.patch_size ** 2, cfg["hidden_size"], bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] -> [B, N, hidden]."""
        cols = F.unfold(pixels, kernel_size=self.patch_size, stride=self.patch_size)   # [B, C*p*p, N]
        b, k, n = cols.shape
        return self.linear(cols.transpose(1, 2).reshape(b * n, k)).view(b, n, -1)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """transformers' Llama 4 pixel_shuffle: [B, s*s, C] -> [B, (s*r)^2, C / r^2], the same reshapes
    (the channel order of each merged row depends on them)."""
    b, n, c = x.shape
    s = math.isqrt(n)
    x = x.view(b, s, int(s * ratio), int(c / ratio)).permute(0, 2, 1, 3).contiguous()
    x = x.view(b, int(s * ratio), int(s * ratio), int(c / ratio ** 2)).permute(0, 2, 1, 3).contiguous()
    return x.view(b, -1, x.shape[-1])


class Llama4VisionMLP2(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = Linear(cfg["intermediate_size"], cfg["projector_input_dim"], bias=False)
        self.fc2 = Linear(cfg["projector_output_dim"], cfg["projector_output_dim"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(x))))


class Llama4VisionPixelShuffleMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.ratio = float(cfg.get("pixel_shuffle_ratio", 0.5))
        self.mlp = Llama4VisionMLP2(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pixel_shuffle(x, self.ratio)
        b, n, c = x.shape
        return self.mlp(x.reshape(b * n, c)).view(b, n, -1)


class Llama4VisionModel(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.image_size, self.patch_size = cfg["image_size"], cfg["patch_size"]
        num_patches = (self.image_size // self.patch_size) ** 2 + 1
        self.patch_embedding = Llama4UnfoldConvolution(cfg)
        self.class_embedding = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.positional_embedding_vlm = nn.Parameter(torch.empty(num_patches, hidden), requires_grad=False)
        self.layernorm_pre = LayerNorm(hidden, 1e-5)
        self.layernorm_post = LayerNorm(hidden, 1e-5)
        self.model = Llama4VisionEncoder(cfg)
        self.vision_adapter = Llama4VisionPixelShuffleMLP(cfg)
        # float32 tables outside the module's state, so a dtype cast of the model leaves them exact
        self._cos, self._sin = vision_rope(cfg)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [B, 3, S, S] -> [B, rows per tile, projector_output_dim]."""
        dtype = self.patch_embedding.linear.weight.dtype
        x = self.patch_embedding(pixel_values.to(dtype))
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm.to(x.dtype)
        x = self.layernorm_pre(x)
        cos, sin = self._cos.to(x.device), self._sin.to(x.device)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        x = self.layernorm_post(x)[:, :-1]
        return self.vision_adapter(x)


__all__ = ["Llama4VisionModel", "pixel_shuffle", "vision_rope"]
