"""SigLIP's vision transformer, parameter names as transformers' SiglipVisionModel (Gemma 3's tower)
and Idefics3VisionTransformer (Idefics3 / SmolVLM's tower, also used by Idefics2).

Both are: patch conv (with bias) + learned position embeddings, pre-norm encoder layers
(LayerNorm, bidirectional attention, gelu-tanh MLP), then ``post_layernorm``; no CLS token.
They differ only in the embeddings: SigLIP adds its position table to a fixed-size image's patches;
Idefics3's NaViT-style variant takes padded tiles with a patch mask, maps each real patch's
fractional (row, col) onto the table's grid (``torch.bucketize``, as transformers does) and masks
padded patches out of attention as keys.

Linear layers are ours (CPU prepacking / dense kernels) but never ISQ-quantized: the families list
the tower under ``isq_skip_prefixes``. SigLIP's attention-pooling head (``vision_use_head``) is not
used by either family: its tensors are skipped by ``map_siglip_name``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.multimodal.encoders.clip import ClipAttention, ClipMLP

# transformers' SiglipVisionConfig / Idefics3VisionConfig defaults (published configs often omit them;
# CLIP's defaults differ: quick_gelu, eps 1e-5).
SIGLIP_DEFAULTS: dict[str, Any] = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "num_channels": 3}


def siglip_config(cfg: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A vision config with SigLIP's defaults (and a family's, e.g. Idefics3's sizes) under it."""
    return {**SIGLIP_DEFAULTS, **(defaults or {}), **{k: v for k, v in cfg.items() if v is not None}}


class SiglipVisionEmbeddings(nn.Module):
    """Fixed resolution: [B, 3, S, S] -> [B, (S / patch)^2, hidden]."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, patch = cfg["hidden_size"], cfg["patch_size"]
        self.patch_size = patch
        self.num_patches_per_side = cfg["image_size"] // patch
        self.patch_embedding = nn.Conv2d(cfg["num_channels"], hidden, patch, patch)
        self.position_embedding = nn.Embedding(self.num_patches_per_side ** 2, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if patches.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"SigLIP: {patches.shape[1]} patches, but the tower has "
                             f"{self.position_embedding.num_embeddings} positions (image size mismatch)")
        return patches + self.position_embedding.weight[None]


class Idefics3VisionEmbeddings(SiglipVisionEmbeddings):
    """Variable resolution: padded tiles [B, 3, H, W] with patch_mask [B, H / patch, W / patch]
    (True: a real patch) -> [B, patches, hidden]. Real patches get the position of their fractional
    coordinates bucketed onto the table's grid; padded ones position 0 (they are masked later)."""

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, _, h, w = pixel_values.shape
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        ph, pw = h // self.patch_size, w // self.patch_size
        if patch_mask is None:
            patch_mask = torch.ones(b, ph, pw, dtype=torch.bool, device=pixel_values.device)
        side = self.num_patches_per_side
        dev = pixel_values.device
        # transformers' arithmetic step by step (float32 fractions, clamp, bucketize right=True)
        boundaries = torch.arange(1 / side, 1.0, 1 / side, device=dev)
        step_h = 1.0 / patch_mask[:, :, 0].sum(dim=1)
        step_w = 1.0 / patch_mask[:, 0, :].sum(dim=1)
        frac_h = torch.arange(ph, device=dev, dtype=torch.float32)[None, :] * step_h[:, None]
        frac_w = torch.arange(pw, device=dev, dtype=torch.float32)[None, :] * step_w[:, None]
        rows = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
        cols = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
        pos = (rows[:, :, None] * side + cols[:, None, :]).reshape(b, -1)
        pos = torch.where(patch_mask.reshape(b, -1), pos, torch.zeros_like(pos))
        return patches + self.position_embedding(pos)


class SiglipAttention(ClipAttention):
    """CLIP's attention (q / k / v / out_proj with biases) with an optional key mask [B, N]."""

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["layer_norm_eps"]
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg["num_hidden_layers"]))


class SiglipVisionTransformer(nn.Module):
    """``embeddings`` / ``encoder.layers.N`` / ``post_layernorm``, as both checkpoints name them.
    ``variable_resolution``: Idefics3's embeddings and patch mask."""

    def __init__(self, cfg: dict[str, Any], variable_resolution: bool = False) -> None:
        super().__init__()
        cfg = siglip_config(cfg)
        self.variable_resolution = variable_resolution
        self.patch_size = cfg["patch_size"]
        self.embeddings = (Idefics3VisionEmbeddings if variable_resolution else SiglipVisionEmbeddings)(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] (and, variable resolution, patch_mask [B, H / p, W / p]) -> last hidden
        state after post_layernorm, [B, patches, hidden]."""
        key_mask = None
        if self.variable_resolution:
            x = self.embeddings(pixel_values, patch_mask)
            if patch_mask is not None and not bool(patch_mask.all()):
                key_mask = patch_mask.reshape(patch_mask.shape[0], -1)
        else:
            x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return self.post_layernorm(x)


def patch_mask_from_pixels(pixel_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, H, W] bool mask of real pixels -> [B, H / p, W / p]: a patch is real when any of its
    pixels is (transformers' unfold + sum > 0)."""
    b, h, w = pixel_mask.shape
    return pixel_mask[:, :h // patch * patch, :w // patch * patch].reshape(b, h // patch, patch, w // patch, patch) \
        .any(dim=4).any(dim=2)


def map_siglip_name(name: str) -> str | None:
    """A tower checkpoint name (below the family's tower prefix) -> ours; None for tensors we do not
    use (the pooling head, position_ids buffers). Handles SiglipVisionModel's older layout with a
    ``vision_model.`` level (transformers < 5 and the published Gemma 3 checkpoints)."""
    name = name.removeprefix("vision_model.")
    if name.startswith("head.") or name.endswith("position_ids"):
        return None
    for src, dst in (("self_attn.q_proj.", "self_attn.q."), ("self_attn.k_proj.", "self_attn.k."),
                     ("self_attn.v_proj.", "self_attn.v.")):
        name = name.replace(src, dst)
    return name


__all__ = ["SIGLIP_DEFAULTS", "SiglipVisionTransformer", "map_siglip_name", "patch_mask_from_pixels",
           "siglip_config"]
