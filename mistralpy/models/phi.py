"""Phi-1 / Phi-1.5 / Phi-2 (transformers' modeling_phi).

Differs from Llama: one LayerNorm (with bias) per layer feeds attention and the MLP in parallel,
both added to the residual; only the first `partial_rotary_factor` of each head is rotated; every
projection has a bias (the attention output is called `dense`, the MLP is fc1 -> gelu_new -> fc2);
the LM head has a bias too. q/k/v are fused at load time as in Llama.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend, AttentionSpec
from mistralpy.errors import ModelLoadError
from mistralpy.layers.activation import get_act_fn
from mistralpy.layers.embedding import LMHead, VocabEmbedding
from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.layers.norm import LayerNorm
from mistralpy.layers.rotary import RotaryEmbedding, get_rope, rope_params_from_config
from mistralpy.models.base import CausalLM, cfg_get


def rotary_dim_from_config(cfg: dict[str, Any], head_dim: int, default_factor: float) -> int:
    """Rotated dims per head as HF computes them: int(head_dim * partial_rotary_factor), the factor
    read from rope_parameters, else the top level, else the family's default (Phi and GLM-4: 0.5)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    if factor is None:
        factor = cfg_get(cfg, "partial_rotary_factor", default=default_factor)
    return int(head_dim * float(factor))


def rope_for(cfg: dict[str, Any], head_dim: int, rotary_dim: int) -> RotaryEmbedding:
    base, scaling = rope_params_from_config(cfg)
    return get_rope(head_dim, rotary_dim, int(cfg.get("max_position_embeddings", 2048)), base, scaling,
                    torch.float32, max_model_len=cfg.get("max_model_len"))


class PhiAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg_get(cfg, "num_key_value_heads", default=self.num_heads)
        self.head_dim = cfg_get(cfg, "head_dim", default=hidden // self.num_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=True)
        self.dense = Linear(self.q_size, hidden, bias=True)
        self.qk_layernorm = bool(cfg.get("qk_layernorm", False))
        if self.qk_layernorm:  # over each head, before rope
            eps = cfg.get("layer_norm_eps", 1e-5)
            self.q_layernorm = LayerNorm(self.head_dim, eps)
            self.k_layernorm = LayerNorm(self.head_dim, eps)
        self.rotary_emb = rope_for(cfg, self.head_dim, rotary_dim_from_config(cfg, self.head_dim, 0.5))
        self.spec = AttentionSpec(scale=self.head_dim ** -0.5)
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        """hidden [T, H] (already normed) -> [T, H]."""
        t = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self.rotary_emb(positions, q, k)  # rotates the first rotary_dim dims, passes the rest
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], attn_metadata, self.spec)
        return self.dense(out.reshape(t, self.q_size))


class PhiMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.fc1 = Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=True)
        self.fc2 = Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=True)
        self.activation_fn = get_act_fn(cfg.get("hidden_act", "gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = PhiAttention(cfg, layer_idx, backend)
        self.mlp = PhiMLP(cfg)
        self.input_layernorm = LayerNorm(cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        normed = self.input_layernorm(hidden)
        # Parallel block, summed in HF's order: attn + mlp + residual.
        return self.self_attn(positions, normed, kv_cache, attn_metadata) + self.mlp(normed) + hidden


class PhiModel(nn.Module):
    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(PhiDecoderLayer(cfg, i, backend) for i in range(cfg["num_hidden_layers"]))
        self.final_layernorm = LayerNorm(cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-5))

    @property
    def norm(self) -> LayerNorm:
        """The final norm under the name the compiled decode path (worker/compile.py) calls."""
        return self.final_layernorm

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        return self.decode_layers(positions, self.embed_tokens(input_ids), kv_caches, attn_metadata)

    def decode_layers(self, positions: torch.Tensor, hidden: torch.Tensor,
                      kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, kv_cache, attn_metadata)
        return self.final_layernorm(hidden)


class LMHeadWithBias(LMHead):
    """logits = h W^T + b (Phi's head has a bias; W may be quantized like any head)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.bias = nn.Parameter(torch.empty(vocab_size), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden) + self.bias


class PhiForCausalLM(CausalLM):
    stacked_params = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2))

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        if cfg.get("tie_word_embeddings", False):
            raise ModelLoadError("Phi with tie_word_embeddings is not supported (no such checkpoint is published)")
        self.model = PhiModel(cfg, backend)
        self.lm_head = LMHeadWithBias(cfg["vocab_size"], cfg["hidden_size"])
        attn = self.model.layers[0].self_attn
        self.num_layers = len(self.model.layers)
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
