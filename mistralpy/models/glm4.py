"""GLM-4 (0414) (transformers' modeling_glm4): Llama with two more RMSNorms per layer (on the
attention output and on the MLP output, before each residual add), Phi-3's fused gate_up_proj,
biases on q/k/v, and partial rotary (half of each head by default) in GPT-J style: *adjacent*
pairs (x[2i], x[2i+1]) are rotated by frequency i, not the two halves.

The rotation is done by our half-split rope on permuted q/k rows: per head, the first rotary_dim
rows of q_proj / k_proj (weights and biases) are reordered at load to [even dims, odd dims]. Then
the rotate-half rope pairs exactly what GPT-J style pairs, and since q and k get the same order,
q.k (all attention uses) is unchanged; v and the pass-through dims keep their order.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.norm import RMSNorm
from mistralpy.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from mistralpy.models.phi import rope_for, rotary_dim_from_config
from mistralpy.models.phi3 import Phi3MLP
from mistralpy.quant.gguf.tensor import GGUFTensor


def neox_row_order(num_heads: int, head_dim: int, rotary_dim: int) -> torch.Tensor:
    """Row indices that turn interleaved rotary pairs into rotate-half halves, head by head."""
    head = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                      torch.arange(rotary_dim, head_dim)])
    return (torch.arange(num_heads)[:, None] * head_dim + head).reshape(-1)


def _reorder_rows(t: torch.Tensor | GGUFTensor, order: torch.Tensor) -> torch.Tensor | GGUFTensor:
    if isinstance(t, GGUFTensor):  # whole rows of blocks move, quantized or not
        return GGUFTensor(t.rows()[order].contiguous(), t.qtype, t.shape)
    return t[order]


class Glm4Attention(LlamaAttention):
    qkv_bias_key = "attention_bias"  # HF default True; configs spell it out
    o_bias_key = None  # never biased

    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__(cfg, layer_idx, backend)
        self.rotary_dim = rotary_dim_from_config(cfg, self.head_dim, 0.5)
        self.rotary_emb = rope_for(cfg, self.head_dim, self.rotary_dim)


class Glm4DecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        nn.Module.__init__(self)
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = Glm4Attention(cfg, layer_idx, backend)
        self.mlp = Phi3MLP(cfg)
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.post_self_attn_layernorm = RMSNorm(hidden, eps)
        self.post_mlp_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        attn = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, attn_metadata)
        hidden = hidden + self.post_self_attn_layernorm(attn)
        return hidden + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(hidden)))


class Glm4Model(LlamaModel):
    layer_cls = Glm4DecoderLayer


class Glm4ForCausalLM(LlamaForCausalLM):
    model_cls = Glm4Model
    stacked_params = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        attn = self.model.layers[0].self_attn
        q_order = neox_row_order(attn.num_heads, attn.head_dim, attn.rotary_dim)
        k_order = neox_row_order(attn.num_kv_heads, attn.head_dim, attn.rotary_dim)

        def permuted() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name.endswith(("q_proj.weight", "q_proj.bias")):
                    tensor = _reorder_rows(tensor, q_order)
                elif name.endswith(("k_proj.weight", "k_proj.bias")):
                    tensor = _reorder_rows(tensor, k_order)
                yield name, tensor

        super().load_weights(permuted())
