"""Gemma 2: Gemma with soft-capped attention scores and logits, queries scaled by
`query_pre_attn_scalar`, local (sliding-window) and global layers alternating, and norms after
attention and around the MLP (four per layer)."""
from __future__ import annotations

from typing import Any

import torch

from mistralpy.attention.backend import AttentionBackend
from mistralpy.models.gemma import GemmaAttention, GemmaDecoderLayer, GemmaForCausalLM, GemmaModel, gemma_rms_norm


class Gemma2Attention(GemmaAttention):
    use_query_pre_attn_scalar = True
    use_attn_softcap = True


class Gemma2DecoderLayer(GemmaDecoderLayer):
    attention_cls = Gemma2Attention

    def __init__(self, cfg: dict[str, Any], layer_idx: int, layer_type: str, backend: AttentionBackend) -> None:
        super().__init__(cfg, layer_idx, layer_type, backend)
        self.pre_feedforward_layernorm = gemma_rms_norm(cfg["hidden_size"], cfg)
        self.post_feedforward_layernorm = gemma_rms_norm(cfg["hidden_size"], cfg)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, attn_metadata)
        hidden = hidden + self.post_attention_layernorm(attn)
        return hidden + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden)))


class Gemma2Model(GemmaModel):
    layer_cls = Gemma2DecoderLayer
    sliding_window_pattern = 2  # older configs without layer_types: even layers local, odd global


class Gemma2ForCausalLM(GemmaForCausalLM):
    model_cls = Gemma2Model
    final_softcap_key = "final_logit_softcapping"
