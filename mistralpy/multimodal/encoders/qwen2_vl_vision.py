"""The Qwen2-VL and Qwen2.5-VL vision transformers, parameter names as transformers'
``Qwen2VisionTransformerPretrainedModel`` / ``Qwen2_5_VisionTransformerPretrainedModel``.

Input: the processor's flattened patches [N, C * temporal_patch * patch**2] (rows already in
merge-window order, multimodal/processors/qwen2_vl.patchify) and grid_thw [n, 3]. The 3-D patch
conv (kernel == stride) is a linear layer over each flattened patch. Attention is bidirectional
within each frame (``cu_seqlens``), with a 2-D RoPE over (row, column) of the patch grid: the first
quarter of a head's dims by row, the second by column (then the usual two halves). The PatchMerger
concatenates each merge window's patches and projects them to the language model's width.

Qwen2.5-VL: RMSNorm, a SwiGLU MLP with biases, and window attention in every block but
``fullatt_block_indexes``: merge windows are regrouped into ``window_size``-pixel windows
(``window_index``) before the blocks and put back in order after the merger.

Linear layers are ours but never ISQ-quantized (the model lists ``visual.`` in ``isq_skip_prefixes``).
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.errors import ModelLoadError
from mistralpy.layers.linear import Linear
from mistralpy.layers.mlp import GatedMLP
from mistralpy.layers.norm import LayerNorm, RMSNorm
from mistralpy.multimodal.encoders.clip import VISION_ACTS

# ---- positions and windows (pure functions of the grid) ------------------------------------------

def vision_position_ids(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """[N, 2] (row, column) of every patch, in the processor's merge-window order, repeated per frame."""
    out = []
    for t, h, w in grid_thw.tolist():
        hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(shape).transpose(1, 2).flatten()
        wpos = wpos.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
    return torch.cat(out)


def frame_seqlens(grid_thw: torch.Tensor) -> list[int]:
    """Cumulative boundaries [0, ...] of the frames: full attention runs within each."""
    bounds = [0]
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


def window_index(grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int
                 ) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL's regrouping (transformers' get_vision_window_index): the order of merge units
    that puts each window's units together [N / merge**2], and the windows' patch boundaries."""
    per_window = window_size // merge // patch_size   # merge units per window side
    unit = merge * merge
    index: list[torch.Tensor] = []
    bounds = [0]
    offset = 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        idx = torch.arange(t * gh * gw).reshape(t, gh, gw)
        # transformers pads by a whole window when a side divides evenly; empty windows drop out below
        pad_h, pad_w = per_window - gh % per_window, per_window - gw % per_window
        nh, nw = (gh + pad_h) // per_window, (gw + pad_w) // per_window
        padded = F.pad(idx, (0, pad_w, 0, pad_h), value=-100)
        padded = padded.reshape(t, nh, per_window, nw, per_window).permute(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, per_window, per_window)
        counts = (padded != -100).sum([2, 3]).reshape(-1)
        flat = padded.reshape(-1)
        index.append(flat[flat != -100] + offset)
        for c in counts.tolist():
            if c:
                bounds.append(bounds[-1] + c * unit)
        offset += t * gh * gw
    return torch.cat(index), bounds


# ---- layers ----------------------------------------------------------------------------------------

class PatchLinear(Linear):
    """The patch conv as a linear layer: a checkpoint's [E, C, T, P, P] kernel loads as [E, C*T*P*P]."""

    def _load_weight(self, param: nn.Parameter, loaded: Any, shard: int | None = None) -> None:
        if isinstance(loaded, torch.Tensor) and loaded.dim() == 5:
            loaded = loaded.reshape(loaded.shape[0], -1)
        super()._load_weight(param, loaded, shard)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, temporal_patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = PatchLinear(in_channels * temporal_patch_size * patch_size ** 2, embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)


class VisionRotaryEmbedding:
    """2-D RoPE tables: cos, sin [N, head_dim / 2] (row frequencies, then column ones), float32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        spatial = head_dim // 2
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)   # [N, 2, head_dim/4]
        freqs = freqs.flatten(1)                                                           # [N, head_dim/2]
        return freqs.cos(), freqs.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated in float32 (as transformers' apply_rotary_pos_emb_vision), back in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = Linear(dim, 3 * dim, bias=True)   # q | k | v, stored fused in the checkpoint
        self.proj = Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, bounds: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))   # [H, N, D]
        out = torch.empty_like(q)
        for a, b in itertools.pairwise(bounds):          # one frame or window at a time, as transformers
            out[:, a:b] = F.scaled_dot_product_attention(q[None, :, a:b], k[None, :, a:b], v[None, :, a:b])[0]
        return self.proj(out.transpose(0, 1).reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        if act not in VISION_ACTS:
            raise ModelLoadError(f"unsupported vision activation {act!r}")
        self.fc1 = Linear(dim, hidden, bias=True)
        self.act = VISION_ACTS[act]
        self.fc2 = Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen2VLVisionBlock(nn.Module):
    def __init__(self, vcfg: dict[str, Any]) -> None:
        super().__init__()
        dim = vcfg["embed_dim"]
        self.norm1 = LayerNorm(dim, eps=1e-6)
        self.norm2 = LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, vcfg["num_heads"])
        self.mlp = VisionMlp(dim, int(dim * vcfg.get("mlp_ratio", 4)), vcfg.get("hidden_act", "quick_gelu"))

    def forward(self, x: torch.Tensor, bounds: list[int], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bounds, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen2_5_VLVisionBlock(nn.Module):
    def __init__(self, vcfg: dict[str, Any]) -> None:
        super().__init__()
        dim = vcfg["hidden_size"]
        self.norm1 = RMSNorm(dim, eps=1e-6)
        self.norm2 = RMSNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, vcfg["num_heads"])
        # checkpoint gate_proj / up_proj load as gate_up_proj's shards (the model's stacked_params)
        self.mlp = GatedMLP(dim, vcfg["intermediate_size"], vcfg.get("hidden_act", "silu"), bias=True)

    forward = Qwen2VLVisionBlock.forward


class PatchMerger(nn.Module):
    """norm, then each merge window's patches side by side -> Linear, GELU, Linear (``mlp.0`` / ``mlp.2``)."""

    def __init__(self, out_dim: int, context_dim: int, merge: int, rms: bool) -> None:
        super().__init__()
        self.hidden = context_dim * merge ** 2
        self.ln_q = RMSNorm(context_dim, eps=1e-6) if rms else LayerNorm(context_dim, eps=1e-6)
        self.mlp = nn.Sequential(Linear(self.hidden, self.hidden, bias=True), nn.GELU(),
                                 Linear(self.hidden, out_dim, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


def _rope_theta(vcfg: dict[str, Any]) -> float:
    rope = vcfg.get("rope_parameters") or {}
    return float(rope.get("rope_theta") or vcfg.get("rope_theta") or 10000.0)


# ---- towers ----------------------------------------------------------------------------------------

class Qwen2VisionTransformer(nn.Module):
    """Qwen2-VL's tower: pixels [N, K], grid_thw [n, 3] -> merged rows [N / merge**2, text hidden]."""

    block_cls: type[nn.Module] = Qwen2VLVisionBlock

    def __init__(self, vcfg: dict[str, Any]) -> None:
        super().__init__()
        self.merge = int(vcfg.get("spatial_merge_size", 2))
        self.patch_size = int(vcfg.get("patch_size") or vcfg.get("spatial_patch_size") or 14)
        dim, out_dim = self._dims(vcfg)
        self.patch_embed = PatchEmbed(self.patch_size, int(vcfg.get("temporal_patch_size", 2)),
                                      int(vcfg.get("in_channels") or vcfg.get("in_chans") or 3), dim)
        self.rotary_pos_emb = VisionRotaryEmbedding(dim // vcfg["num_heads"], _rope_theta(vcfg))
        self.blocks = nn.ModuleList(self.block_cls(vcfg) for _ in range(vcfg["depth"]))
        self.merger = PatchMerger(out_dim, dim, self.merge, rms=self.block_cls is not Qwen2VLVisionBlock)

    @staticmethod
    def _dims(vcfg: dict[str, Any]) -> tuple[int, int]:
        """(tower width, output width): Qwen2-VL's embed_dim / hidden_size."""
        return vcfg["embed_dim"], vcfg["hidden_size"]

    @property
    def dtype(self) -> torch.dtype:
        return self.merger.ln_q.weight.dtype

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.reshape(-1, 3).cpu()
        x = self.patch_embed(pixels.to(self.dtype))
        cos, sin = self.rotary_pos_emb(vision_position_ids(grid_thw, self.merge).to(x.device))
        bounds = frame_seqlens(grid_thw)
        for blk in self.blocks:
            x = blk(x, bounds, cos, sin)
        return self.merger(x)


class Qwen2_5_VisionTransformer(Qwen2VisionTransformer):
    """Qwen2.5-VL's tower: window attention except in ``fullatt_block_indexes``."""

    block_cls = Qwen2_5_VLVisionBlock

    def __init__(self, vcfg: dict[str, Any]) -> None:
        super().__init__(vcfg)
        self.window_size = int(vcfg.get("window_size", 112))
        self.fullatt_block_indexes = frozenset(int(i) for i in vcfg.get("fullatt_block_indexes") or ())

    @staticmethod
    def _dims(vcfg: dict[str, Any]) -> tuple[int, int]:
        return vcfg["hidden_size"], vcfg["out_hidden_size"]

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grid_thw = grid_thw.reshape(-1, 3).cpu()
        x = self.patch_embed(pixels.to(self.dtype))
        n, unit = x.shape[0], self.merge ** 2
        order, window_bounds = window_index(grid_thw, self.merge, self.window_size, self.patch_size)
        order = order.to(x.device)

        def regroup(t: torch.Tensor) -> torch.Tensor:   # merge units in window order
            return t.view(n // unit, unit, -1)[order].reshape(n, -1)

        cos, sin = self.rotary_pos_emb(vision_position_ids(grid_thw, self.merge).to(x.device))
        x, cos, sin = regroup(x), regroup(cos), regroup(sin)
        frame_bounds = frame_seqlens(grid_thw)
        for i, blk in enumerate(self.blocks):
            x = blk(x, frame_bounds if i in self.fullatt_block_indexes else window_bounds, cos, sin)
        return self.merger(x)[torch.argsort(order)]
