"""SmolLM3 (transformers' modeling_smollm3): Llama in which some layers use no positional
encoding at all (NoPE): `no_rope_layers[i]` is 1 where layer i applies rope and 0 where it does
not; without the list, every `no_rope_layer_interval`-th layer (the 4th, 8th, ...) is NoPE.
Sliding-window layers, if any, are named by `layer_types` as in Llama.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def layer_uses_rope(cfg: dict[str, Any], layer_idx: int) -> bool:
    flags = cfg.get("no_rope_layers")
    if flags is not None:
        return bool(flags[layer_idx])
    return (layer_idx + 1) % int(cfg.get("no_rope_layer_interval", 4)) != 0


class NoRope(nn.Module):
    """Stands in for the rotary embedding of a NoPE layer: q and k pass unchanged."""

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class SmolLM3Attention(LlamaAttention):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__(cfg, layer_idx, backend)
        self.use_rope = layer_uses_rope(cfg, layer_idx)
        if not self.use_rope:
            self.rotary_emb = NoRope()


class SmolLM3DecoderLayer(LlamaDecoderLayer):
    attention_cls = SmolLM3Attention


class SmolLM3Model(LlamaModel):
    layer_cls = SmolLM3DecoderLayer


class SmolLM3ForCausalLM(LlamaForCausalLM):
    model_cls = SmolLM3Model
