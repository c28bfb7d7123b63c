"""CLIP's vision transformer (LLaVA's tower), parameter names as transformers' CLIPVisionModel.

Bidirectional attention over [CLS] + patches; ``forward`` returns the hidden states after every
layer up to the one the family selects (LLaVA reads layer -2), so later layers are not run.
Linear layers are ours (CPU prepacking / dense kernels) but never ISQ-quantized: the model lists
the tower under ``isq_skip_prefixes``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers.linear import Linear


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


VISION_ACTS = {"quick_gelu": quick_gelu, "gelu": F.gelu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class ClipVisionEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, patch, size = cfg["hidden_size"], cfg["patch_size"], cfg["image_size"]
        self.patch_size = patch
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(cfg.get("num_channels", 3), hidden, patch, patch, bias=False)
        self.position_embedding = nn.Embedding((size // patch) ** 2 + 1, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] at the configured image size -> [B, 1 + patches, hidden]."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        if patches.shape[1] + 1 != self.position_embedding.num_embeddings:
            raise ValueError(f"CLIP: {patches.shape[1]} patches, but the tower has "
                             f"{self.position_embedding.num_embeddings - 1} positions (image size mismatch)")
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class ClipAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.head_dim = hidden // self.num_heads
        self.q = Linear(hidden, hidden, bias=True)   # checkpoint q_proj / k_proj / v_proj (see map_vision_name)
        self.k = Linear(hidden, hidden, bias=True)
        self.v = Linear(hidden, hidden, bias=True)
        self.out_proj = Linear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class ClipMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.act = VISION_ACTS[cfg.get("hidden_act", "quick_gelu")]
        self.fc1 = Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=True)
        self.fc2 = Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        eps = cfg.get("layer_norm_eps", 1e-5)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg["hidden_size"], eps=eps)
        self.mlp = ClipMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg["hidden_size"], eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(num_layers))


class ClipVisionTransformer(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_layers: int | None = None) -> None:
        super().__init__()
        eps = cfg.get("layer_norm_eps", 1e-5)
        self.embeddings = ClipVisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg["hidden_size"], eps=eps)   # (transformers' spelling)
        self.encoder = ClipEncoder(cfg, cfg["num_hidden_layers"] if num_layers is None else num_layers)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """hidden_states as transformers numbers them: [0] the embeddings, [i] after layer i."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states


class ClipVisionModel(nn.Module):
    """``vision_model.*`` as in a CLIPVisionModel checkpoint; only the layers up to ``num_layers``
    are built (the rest of the checkpoint is skipped by the family's name mapping)."""

    def __init__(self, cfg: dict[str, Any], num_layers: int | None = None) -> None:
        super().__init__()
        self.vision_model = ClipVisionTransformer(cfg, num_layers)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return self.vision_model(pixel_values)


def map_vision_name(name: str, num_layers: int) -> str | None:
    """A CLIP checkpoint name (below the tower's prefix) -> ours; None for unused tensors
    (layers past the selected one, post_layernorm, position_ids buffers)."""
    if "post_layernorm" in name or name.endswith("position_ids"):
        return None
    if ".encoder.layers." in name:
        idx = int(name.split(".encoder.layers.")[1].split(".")[0])
        if idx >= num_layers:
            return None
    for src, dst in (("self_attn.q_proj.", "self_attn.q."), ("self_attn.k_proj.", "self_attn.k."),
                     ("self_attn.v_proj.", "self_attn.v.")):
        name = name.replace(src, dst)
    return name
