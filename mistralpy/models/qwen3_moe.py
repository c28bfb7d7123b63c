"""Qwen3-MoE: Qwen 3 attention (RMSNorm on q and k heads) with sparse experts of
``moe_intermediate_size`` in most layers and dense MLPs of ``intermediate_size`` in the others.

A layer is sparse unless it is listed in ``mlp_only_layers`` or ``(layer + 1) % decoder_sparse_step``
is non-zero. The router's softmax top-k probabilities are renormalised only with ``norm_topk_prob``.
Checkpoint names: ``mlp.gate`` (router), ``mlp.experts.N.{gate,up,down}_proj``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.models.llama import LlamaMLP, LlamaModel
from mistralpy.models.mixtral import MixtralSparseMoeBlock, MoECausalLM, MoEDecoderLayer, num_experts_of
from mistralpy.models.qwen3 import Qwen3Attention


def is_sparse_layer(cfg: dict[str, Any], layer_idx: int) -> bool:
    step = int(cfg.get("decoder_sparse_step") or 1)
    return (layer_idx not in (cfg.get("mlp_only_layers") or []) and num_experts_of(cfg) > 0
            and (layer_idx + 1) % step == 0)


class Qwen3MoeSparseMoeBlock(MixtralSparseMoeBlock):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg, intermediate_size=cfg["moe_intermediate_size"])
        self.renormalize = bool(cfg.get("norm_topk_prob", False))
        self.weight_dtype = torch.get_default_dtype()  # the model dtype (set while building)

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = super().route(router_logits)
        # transformers rounds the routing weights to the model dtype before use (a no-op in float32).
        return weights.to(self.weight_dtype).float(), ids


class Qwen3MoeAttention(Qwen3Attention):
    pass


class Qwen3MoeDecoderLayer(MoEDecoderLayer):
    attention_cls = Qwen3MoeAttention

    def make_mlp(self, cfg: dict[str, Any], layer_idx: int) -> nn.Module:
        return Qwen3MoeSparseMoeBlock(cfg) if is_sparse_layer(cfg, layer_idx) else LlamaMLP(cfg)


class Qwen3MoeModel(LlamaModel):
    layer_cls = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(MoECausalLM):
    model_cls = Qwen3MoeModel

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        # transformers applies a sliding window (use_sliding_window) to every layer; drop Qwen 2's
        # max_window_layers, which layer_sliding_window would read, so it cannot exempt layers.
        super().__init__({k: v for k, v in cfg.items() if k != "max_window_layers"}, backend)
