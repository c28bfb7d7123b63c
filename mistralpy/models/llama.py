"""Llama family: Llama 2 / 3.x and Mistral (sliding window); the base of Qwen 2 and Qwen 3.

Follows transformers' modeling_llama class order and parameter names; q/k/v and gate/up are
fused at load time (see ``stacked_params``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend, AttentionSpec
from mistralpy.layers.embedding import LMHead, VocabEmbedding
from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.layers.mlp import GatedMLP
from mistralpy.layers.norm import RMSNorm
from mistralpy.layers.rotary import get_rope, partial_rotary_factor_from_config, rope_params_from_config
from mistralpy.models.base import CausalLM, cfg_get


def layer_sliding_window(cfg: dict[str, Any], layer_idx: int) -> int | None:
    """Window of one layer: transformers-5 `layer_types`, else a global `sliding_window`."""
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if cfg.get("use_sliding_window") is False:
        return None
    if "max_window_layers" in cfg and layer_idx < cfg["max_window_layers"]:
        return None  # Qwen2 convention: the first max_window_layers layers use full attention
    return window


class LlamaMLP(GatedMLP):
    """SwiGLU MLP from the config; ``intermediate_size`` overrides the config's (DeepSeek's shared
    experts)."""

    def __init__(self, cfg: dict[str, Any], intermediate_size: int | None = None) -> None:
        super().__init__(cfg["hidden_size"], intermediate_size or cfg["intermediate_size"],
                         cfg.get("hidden_act", "silu"), bias=bool(cfg.get("mlp_bias", False)))


class LlamaAttention(nn.Module):
    # Family switches, overridden by Qwen 2 / Qwen 3 subclasses.
    qkv_bias_key = "attention_bias"
    o_bias_key: str | None = "attention_bias"
    qk_norm = False

    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg_get(cfg, "num_key_value_heads", default=self.num_heads)
        self.head_dim = cfg_get(cfg, "head_dim", default=hidden // self.num_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        qkv_bias = bool(cfg.get(self.qkv_bias_key, False)) if self.qkv_bias_key else True
        o_bias = bool(cfg.get(self.o_bias_key, False)) if self.o_bias_key else False
        self.qkv_proj = MergedLinear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias)
        self.o_proj = Linear(self.q_size, hidden, bias=o_bias)
        if self.qk_norm:
            eps = cfg.get("rms_norm_eps", 1e-6)
            self.q_norm = RMSNorm(self.head_dim, eps)
            self.k_norm = RMSNorm(self.head_dim, eps)
        base, scaling = rope_params_from_config(cfg)
        self.rotary_emb = get_rope(self.head_dim, self.head_dim, int(cfg.get("max_position_embeddings", 4096)),
                                   base, scaling, torch.float32,
                                   partial_rotary_factor=partial_rotary_factor_from_config(cfg),
                                   max_model_len=cfg.get("max_model_len"))
        self.spec = AttentionSpec(scale=self.head_dim ** -0.5, sliding_window=layer_sliding_window(cfg, layer_idx))
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        t = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], attn_metadata, self.spec)
        return self.o_proj(out.reshape(t, self.q_size))


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = self.attention_cls(cfg, layer_idx, backend)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), kv_cache, attn_metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(self.layer_cls(cfg, i, backend) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        return self.decode_layers(positions, self.embed_tokens(input_ids), kv_caches, attn_metadata)

    def decode_layers(self, positions: torch.Tensor, hidden: torch.Tensor,
                      kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        """Everything after the embedding lookup: the part worker/compile.py compiles."""
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, kv_cache, attn_metadata)
        return self.norm(hidden)


class LlamaForCausalLM(CausalLM):
    model_cls = LlamaModel
    stacked_params = (
        ("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
        ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.model = self.model_cls(cfg, backend)
        tied = cfg.get("tie_word_embeddings", False)
        self.lm_head = LMHead(cfg["vocab_size"], cfg["hidden_size"], self.model.embed_tokens if tied else None)
        attn = self.model.layers[0].self_attn
        self.num_layers = len(self.model.layers)
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral is Llama with an optional sliding window (read from config by each layer)."""
