"""The Qwen3-VL vision transformer, parameter names as transformers' ``Qwen3VLVisionModel``.

Like Qwen2-VL's tower (multimodal/encoders/qwen2_vl_vision.py, whose patch rows, 2-D RoPE,
attention and frame boundaries it reuses) plus:

- a bias on the patch "conv" and a learned square position table (``pos_embed``,
  num_position_embeddings = side**2) resampled bilinearly (align_corners) to each image's patch
  grid and added to the patch rows (transformers' fast_pos_embed_interpolate /
  vision_utils.get_vision_interpolation_indices_and_weights);
- LayerNorm blocks with a ``linear_fc1`` / ``linear_fc2`` MLP (gelu_pytorch_tanh);
- the merger (norm over each patch, then merge windows side by side -> fc1, GELU, fc2) and the
  DeepStack mergers: after each block in ``deepstack_visual_indexes`` a merger with its norm over
  the concatenated window ("post-shuffle") gives rows that the decoder adds to the hidden states of
  its first layers at the image positions (models/qwen3_vl.py).

Linear layers are ours but never ISQ-quantized (the model lists ``visual.`` in ``isq_skip_prefixes``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.errors import ModelLoadError
from mistralpy.layers.linear import Linear
from mistralpy.layers.norm import LayerNorm
from mistralpy.multimodal.encoders.clip import VISION_ACTS
from mistralpy.multimodal.encoders.qwen2_vl_vision import (
    PatchLinear,
    VisionAttention,
    VisionRotaryEmbedding,
    _rope_theta,
    frame_seqlens,
    vision_position_ids,
)


def interpolation_taps(rowcol: torch.Tensor, hw: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps into the side x side table for patches at rowcol [N, 2] of grids
    hw [N, 2]: indices, weights [N, 4] in transformers' order (h0w0, h0w1, h1w0, h1w1)."""
    src = rowcol.float() * (side - 1) / torch.clamp(hw - 1, min=1).float()
    floor = torch.floor(src)
    offsets = torch.arange(0, 2, device=rowcol.device)
    taps = (floor.long()[..., None] + offsets).clamp(0, side - 1)                 # [N, 2 axes, 2]
    weights = (1 - (src[..., None] - floor[..., None] - offsets).abs()).clamp(min=0)
    indices = (taps[:, 0, :, None] * side + taps[:, 1, None, :]).reshape(-1, 4)
    return indices, (weights[:, 0, :, None] * weights[:, 1, None, :]).reshape(-1, 4)


class Qwen3VLVisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act not in VISION_ACTS:
            raise ModelLoadError(f"unsupported vision activation {act!r}")
        self.linear_fc1 = Linear(dim, hidden, bias=True)
        self.act = VISION_ACTS[act]
        self.linear_fc2 = Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VLVisionBlock(nn.Module):
    def __init__(self, vcfg: dict[str, Any]) -> None:
        super().__init__()
        dim = vcfg["hidden_size"]
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, vcfg["num_heads"])
        self.mlp = Qwen3VLVisionMLP(dim, vcfg["intermediate_size"], vcfg.get("hidden_act", "gelu_pytorch_tanh"))

    def forward(self, x: torch.Tensor, bounds: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bounds, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen3VLPatchMerger(nn.Module):
    """norm (per patch, or with ``postshuffle`` over the merge window's concatenation), fc1, GELU, fc2."""

    def __init__(self, dim: int, out_dim: int, merge: int, postshuffle: bool) -> None:
        super().__init__()
        self.hidden = dim * merge ** 2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.hidden if postshuffle else dim, eps=1e-6)
        self.linear_fc1 = Linear(self.hidden, self.hidden, bias=True)
        self.act = nn.GELU()
        self.linear_fc2 = Linear(self.hidden, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.hidden)) if self.postshuffle else self.norm(x).view(-1, self.hidden)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class PosEmbed(nn.Module):
    """The learned position table, ``pos_embed.weight`` [side**2, dim]."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)


class Qwen3VisionTransformer(nn.Module):
    """pixels [N, K], grid_thw [n, 3] -> (merged rows [N / merge**2, out], one [N / merge**2, out]
    per DeepStack layer); ``forward`` returns them concatenated along the features."""

    def __init__(self, vcfg: dict[str, Any]) -> None:
        super().__init__()
        self.merge = int(vcfg.get("spatial_merge_size", 2))
        self.patch_size = int(vcfg.get("patch_size", 16))
        dim, out_dim = int(vcfg["hidden_size"]), int(vcfg["out_hidden_size"])
        temporal, channels = int(vcfg.get("temporal_patch_size", 2)), int(vcfg.get("in_channels", 3))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = PatchLinear(channels * temporal * self.patch_size ** 2, dim, bias=True)
        num_pos = int(vcfg.get("num_position_embeddings", 2304))
        self.side = int(num_pos ** 0.5)
        self.pos_embed = PosEmbed(num_pos, dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(dim // vcfg["num_heads"], _rope_theta(vcfg))
        self.blocks = nn.ModuleList(Qwen3VLVisionBlock(vcfg) for _ in range(vcfg["depth"]))
        self.merger = Qwen3VLPatchMerger(dim, out_dim, self.merge, postshuffle=False)
        self.deepstack_visual_indexes = [int(i) for i in vcfg.get("deepstack_visual_indexes") or ()]
        self.deepstack_merger_list = nn.ModuleList(Qwen3VLPatchMerger(dim, out_dim, self.merge, postshuffle=True)
                                                   for _ in self.deepstack_visual_indexes)

    @property
    def dtype(self) -> torch.dtype:
        return self.merger.norm.weight.dtype

    def position_embeddings(self, rowcol: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[N, dim]: the table resampled to each patch's grid (rowcol from vision_position_ids)."""
        hw = torch.cat([torch.tensor([[h, w]]).expand(t * h * w, 2) for t, h, w in grid_thw.tolist()])
        idx, wts = interpolation_taps(rowcol, hw.to(rowcol.device), self.side)
        return (self.pos_embed.weight[idx] * wts[:, :, None].to(self.pos_embed.weight.dtype)).sum(1)

    def features(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        grid_thw = grid_thw.reshape(-1, 3).cpu()
        x = self.patch_embed.proj(pixels.to(self.dtype))
        rowcol = vision_position_ids(grid_thw, self.merge).to(x.device)
        x = x + self.position_embeddings(rowcol, grid_thw).to(x.dtype)
        cos, sin = self.rotary_pos_emb(rowcol)
        bounds = frame_seqlens(grid_thw)
        deepstack: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, bounds, cos, sin)
            if i in self.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        main, deepstack = self.features(pixels, grid_thw)
        return torch.cat([main, *deepstack], dim=-1)
