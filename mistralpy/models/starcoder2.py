"""StarCoder2 (transformers' modeling_starcoder2): Llama attention (GQA, rope, optional sliding
window) with biases on every projection (`use_bias`), LayerNorms with bias instead of RMSNorm,
and a plain MLP c_fc -> gelu_pytorch_tanh -> c_proj. The head is tied to the embedding by default.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.activation import get_act_fn
from mistralpy.layers.embedding import VocabEmbedding
from mistralpy.layers.linear import Linear
from mistralpy.layers.norm import LayerNorm
from mistralpy.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class Starcoder2Attention(LlamaAttention):
    qkv_bias_key = "use_bias"
    o_bias_key = "use_bias"


class Starcoder2MLP(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        bias = bool(cfg.get("use_bias", True))
        self.c_fc = Linear(cfg["hidden_size"], cfg["intermediate_size"], bias=bias)
        self.c_proj = Linear(cfg["intermediate_size"], cfg["hidden_size"], bias=bias)
        self.act = get_act_fn(cfg.get("hidden_act", "gelu_pytorch_tanh"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Starcoder2DecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        nn.Module.__init__(self)
        eps = cfg.get("norm_epsilon", 1e-5)
        self.self_attn = Starcoder2Attention(cfg, layer_idx, backend)
        self.mlp = Starcoder2MLP(cfg)
        self.input_layernorm = LayerNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = LayerNorm(cfg["hidden_size"], eps)


class Starcoder2Model(LlamaModel):
    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(Starcoder2DecoderLayer(cfg, i, backend) for i in range(cfg["num_hidden_layers"]))
        self.norm = LayerNorm(cfg["hidden_size"], cfg.get("norm_epsilon", 1e-5))


class Starcoder2ForCausalLM(LlamaForCausalLM):
    model_cls = Starcoder2Model
    stacked_params = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2))

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        # HF's default is a tied head: a config.json that leaves the key out means tied.
        super().__init__({**cfg, "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}, backend)
