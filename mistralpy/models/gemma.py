"""Gemma (1): Llama-shaped, with embeddings scaled by sqrt(hidden_size), RMSNorm as x * (1 + w),
a GeGLU MLP (tanh GELU) and an LM head tied to the embedding.

Follows transformers' modeling_gemma class order and parameter names; q/k/v and gate/up are fused
at load time. The attention and decoder-layer classes take family switches (class attributes) so
that Gemma 2 (gemma2.py) and Gemma 3 (gemma3.py) only override what differs.
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
from mistralpy.layers.rotary import RotaryEmbedding, get_rope, rope_params_from_config
from mistralpy.models.base import CausalLM, cfg_get
from mistralpy.models.llama import LlamaAttention, LlamaForCausalLM


def gemma_rms_norm(dim: int, cfg: dict[str, Any]) -> RMSNorm:
    """Gemma's norm: x / rms(x) * (1 + w), computed in float32 (the checkpoint stores w, not 1 + w)."""
    return RMSNorm(dim, cfg.get("rms_norm_eps", 1e-6), offset=1.0)


def gemma_activation(cfg: dict[str, Any]) -> str:
    """Gemma 2/3 name it `hidden_activation`; Gemma 1 `hidden_act`, where the published configs'
    "gelu" means the tanh approximation (transformers rewrites it so)."""
    name = cfg_get(cfg, "hidden_activation", "hidden_act", default="gelu_pytorch_tanh")
    return "gelu_pytorch_tanh" if name == "gelu" else name


def gemma_layer_types(cfg: dict[str, Any], pattern: int | None) -> list[str]:
    """Per-layer "sliding_attention" / "full_attention": transformers-5 `layer_types`, else every
    `pattern`-th layer (1-based) global and the others local (`sliding_window_pattern` in older
    configs); `pattern` None means every layer is global (Gemma 1)."""
    n = cfg["num_hidden_layers"]
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])[:n]
    pattern = cfg.get("sliding_window_pattern", pattern)
    if pattern is None or not cfg.get("sliding_window"):
        return ["full_attention"] * n
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]


class GemmaMLP(GatedMLP):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg["hidden_size"], cfg["intermediate_size"], gemma_activation(cfg))


class GemmaAttention(LlamaAttention):
    """Llama's attention forward (inherited) with Gemma's projections, norms, scaling and rope."""

    # Family switches (Gemma 2 / 3 override them).
    use_query_pre_attn_scalar = False  # scale by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5
    use_attn_softcap = False           # tanh soft-capping of the scores (attn_logit_softcapping)
    qk_norm = False                    # (1 + w) RMSNorm on each head of q and k before rope

    def __init__(self, cfg: dict[str, Any], layer_idx: int, layer_type: str, backend: AttentionBackend) -> None:
        nn.Module.__init__(self)  # not LlamaAttention's: Gemma builds its own pieces
        hidden = cfg["hidden_size"]
        self.layer_type = layer_type
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg_get(cfg, "num_key_value_heads", default=self.num_heads)
        self.head_dim = cfg_get(cfg, "head_dim", default=hidden // self.num_heads)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(cfg.get("attention_bias", False))
        self.qkv_proj = MergedLinear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=bias)
        self.o_proj = Linear(self.q_size, hidden, bias=bias)
        if self.qk_norm:
            self.q_norm = gemma_rms_norm(self.head_dim, cfg)
            self.k_norm = gemma_rms_norm(self.head_dim, cfg)
        self.rotary_emb = self.make_rope(cfg, layer_type)
        scalar = cfg.get("query_pre_attn_scalar") if self.use_query_pre_attn_scalar else None
        softcap = cfg.get("attn_logit_softcapping") if self.use_attn_softcap else None
        window = cfg.get("sliding_window") if layer_type == "sliding_attention" else None
        self.spec = AttentionSpec(scale=float(scalar or self.head_dim) ** -0.5, sliding_window=window,
                                  logit_softcap=float(softcap) if softcap else None)
        self.backend = backend

    def make_rope(self, cfg: dict[str, Any], layer_type: str) -> RotaryEmbedding:
        base, scaling = rope_params_from_config(cfg)
        return get_rope(self.head_dim, self.head_dim, int(cfg.get("max_position_embeddings", 8192)), base, scaling,
                        torch.float32, max_model_len=cfg.get("max_model_len"))


class GemmaDecoderLayer(nn.Module):
    attention_cls = GemmaAttention

    def __init__(self, cfg: dict[str, Any], layer_idx: int, layer_type: str, backend: AttentionBackend) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(cfg, layer_idx, layer_type, backend)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = gemma_rms_norm(cfg["hidden_size"], cfg)
        self.post_attention_layernorm = gemma_rms_norm(cfg["hidden_size"], cfg)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), kv_cache, attn_metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GemmaModel(nn.Module):
    layer_cls = GemmaDecoderLayer
    sliding_window_pattern: int | None = None  # Gemma 1 has no local layers

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layer_types = gemma_layer_types(cfg, self.sliding_window_pattern)
        self.layers = nn.ModuleList(self.layer_cls(cfg, i, kind, backend) for i, kind in enumerate(self.layer_types))
        self.norm = gemma_rms_norm(cfg["hidden_size"], cfg)
        # sqrt(hidden) rounded to the model dtype, as transformers multiplies (55.4256 is 55.5 in bf16).
        normalizer = torch.tensor(cfg["hidden_size"] ** 0.5, dtype=torch.float32).to(torch.get_default_dtype())
        self.register_buffer("normalizer", normalizer, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        return self.decode_layers(positions, hidden * self.normalizer.to(hidden.dtype), kv_caches, attn_metadata)

    def decode_layers(self, positions: torch.Tensor, hidden: torch.Tensor,
                      kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        """Everything after the embedding lookup: the part worker/compile.py compiles."""
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(positions, hidden, kv_cache, attn_metadata)
        return self.norm(hidden)


class GemmaForCausalLM(LlamaForCausalLM):
    """The LM head is tied unless the config says otherwise; Gemma 2/3 soft-cap the logits."""

    model_cls = GemmaModel
    final_softcap_key: str | None = None

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        CausalLM.__init__(self)
        self.model = self.model_cls(cfg, backend)
        tied = cfg.get("tie_word_embeddings", True)
        self.lm_head = LMHead(cfg["vocab_size"], cfg["hidden_size"], self.model.embed_tokens if tied else None)
        attn = self.model.layers[0].self_attn
        self.num_layers = len(self.model.layers)
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        cap = cfg.get(self.final_softcap_key) if self.final_softcap_key else None
        self.final_logit_softcapping = float(cap) if cap else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
