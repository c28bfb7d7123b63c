"""Mixtral: Mistral attention (optional sliding window) with a sparse mixture of SwiGLU experts in
place of the MLP. The router takes a softmax over all experts, keeps the top k and renormalises
their probabilities to sum to 1.

Checkpoints name the block ``block_sparse_moe`` with ``gate`` (router) and ``experts.N.w1/w3/w2``
(gate/up/down); transformers 5 names it ``mlp`` and may hold fused 3-D expert tensors. Our module
is ``mlp`` (``gate``, ``experts``: layers/moe.py); every spelling is mapped onto it on load.
Also the base of Qwen3-MoE and Phi-3.5-MoE (``MoEDecoderLayer`` / ``MoECausalLM``).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.moe import FusedExperts, Router, split_all_fused_experts, topk_softmax_routing
from mistralpy.layers.norm import RMSNorm
from mistralpy.models.base import cfg_get
from mistralpy.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def num_experts_of(cfg: dict[str, Any]) -> int:
    # transformers 5 writes num_local_experts for every family; Qwen3-MoE hub configs say num_experts.
    return int(cfg_get(cfg, "num_local_experts", "num_experts", default=0))


class MixtralSparseMoeBlock(nn.Module):
    """Router + experts: [T, H] -> [T, H]."""

    renormalize = True

    def __init__(self, cfg: dict[str, Any], intermediate_size: int | None = None) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_experts = num_experts_of(cfg)
        self.top_k = int(cfg["num_experts_per_tok"])
        self.gate = Router(hidden, self.num_experts)
        self.experts = FusedExperts(self.num_experts, hidden, intermediate_size or cfg["intermediate_size"],
                                    cfg.get("hidden_act", "silu"))

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """router_logits [T, E] -> (weights [T, k] float32, expert ids [T, k])."""
        return topk_softmax_routing(router_logits, self.top_k, self.renormalize)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(self.gate(hidden))
        return self.experts(hidden, weights, ids)


class MoEDecoderLayer(LlamaDecoderLayer):
    """A Llama-style layer whose feed-forward block is chosen per layer (``make_mlp``)."""

    norm_cls: type[nn.Module] = RMSNorm

    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        nn.Module.__init__(self)  # not LlamaDecoderLayer's: it would allocate a dense MLP first
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = self.attention_cls(cfg, layer_idx, backend)
        self.mlp = self.make_mlp(cfg, layer_idx)
        self.input_layernorm = self.norm_cls(cfg["hidden_size"], eps)
        self.post_attention_layernorm = self.norm_cls(cfg["hidden_size"], eps)

    def make_mlp(self, cfg: dict[str, Any], layer_idx: int) -> nn.Module:
        return MixtralSparseMoeBlock(cfg)


class MixtralAttention(LlamaAttention):
    pass


class MixtralDecoderLayer(MoEDecoderLayer):
    attention_cls = MixtralAttention


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MoECausalLM(LlamaForCausalLM):
    """Loading shared by the MoE families: expert and router names onto our ``mlp`` block."""

    stacked_params = LlamaForCausalLM.stacked_params + (
        ("gate_up_proj", "w1", 0), ("gate_up_proj", "w3", 1),
    )
    # (checkpoint spelling, ours), applied in order to every name.
    renames: tuple[tuple[str, str], ...] = (
        (".block_sparse_moe.", ".mlp."),
        (".mlp.router.", ".mlp.gate."),  # transformers-5 Phi-MoE
    )

    def map_weight_name(self, name: str) -> str | None:
        for old, new in self.renames:
            name = name.replace(old, new)
        if ".experts." in name:
            name = name.replace(".w2.", ".down_proj.")
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Fused 3-D expert tensors (transformers 5 in-memory layout) become per-expert ones first.
        super().load_weights(split_all_fused_experts(weights))


class MixtralForCausalLM(MoECausalLM):
    model_cls = MixtralModel
