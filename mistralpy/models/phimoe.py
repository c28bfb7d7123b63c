"""Phi-3.5-MoE: Mixtral's layout with LayerNorm (with bias) instead of RMSNorm, optional biases on
q/k/v/o and on the LM head, longrope, and "sparsemixer" top-2 routing.

Sparsemixer at inference (transformers' ``sparsemixer`` with ``training=False``): the first expert
is the arg-max of the router logits; its weight is its softmax probability among the experts whose
logit is within a relative distance ``2 * router_jitter_noise`` of that maximum (the others are
masked out). The second expert is the arg-max once the first is excluded, weighted the same way
among the remaining experts close to it. The two weights are not renormalised.

Rope: longrope whose attention factor is ``short_mscale`` / ``long_mscale``. transformers picks
the mscale from the current sequence length but always uses ``short_factor`` frequencies; a KV
cache needs one setting per engine, so (as rotary.py does for Phi-3) we use the long factors and
``long_mscale`` iff ``max_model_len > original_max_position_embeddings``, else the short ones. Up to
the original context the two agree exactly.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.errors import ModelLoadError
from mistralpy.layers.embedding import LMHead
from mistralpy.layers.norm import LayerNorm
from mistralpy.layers.rotary import rope_params_from_config
from mistralpy.models.llama import LlamaAttention, LlamaModel
from mistralpy.models.mixtral import MixtralSparseMoeBlock, MoECausalLM, MoEDecoderLayer


def sparsemixer_routing(router_logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-MoE's inference-time top-2 routing.

    router_logits [T, E] -> (weights [T, 2] float32, expert ids [T, 2] int64).
    """
    scores = router_logits.float()
    weights, ids = [], []
    candidates = scores
    for _ in range(2):
        top, idx = candidates.max(dim=-1, keepdim=True)
        # Relative gap to the current maximum, measured against the raw scores (as transformers does:
        # for the second pick the first expert's raw score is above `top`, so only the -inf of
        # `candidates` keeps it out).
        gap = (top - scores) / scores.abs().clamp(min=top)
        probs = torch.softmax(candidates.masked_fill(gap > 2 * jitter_eps, float("-inf")), dim=-1)
        weights.append(probs.gather(-1, idx))
        ids.append(idx)
        candidates = candidates.scatter(-1, idx, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


class PhimoeSparseMoeBlock(MixtralSparseMoeBlock):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg)
        if self.top_k != 2:
            raise ModelLoadError(f"Phi-MoE's sparsemixer routing picks 2 experts; config says {self.top_k}")
        self.jitter_eps = float(cfg.get("router_jitter_noise", 0.01))

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sparsemixer_routing(router_logits, self.jitter_eps)


class PhimoeAttention(LlamaAttention):
    # attention_bias switches the biases of q/k/v and o together (LlamaAttention's default keys).
    pass


class PhimoeDecoderLayer(MoEDecoderLayer):
    attention_cls = PhimoeAttention
    norm_cls = LayerNorm

    def make_mlp(self, cfg: dict[str, Any], layer_idx: int) -> nn.Module:
        return PhimoeSparseMoeBlock(cfg)


class PhimoeModel(LlamaModel):
    layer_cls = PhimoeDecoderLayer

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        self.norm = LayerNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-5))


class PhimoeLMHead(LMHead):
    """The LM head with an optional bias (``lm_head_bias``)."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool) -> None:
        super().__init__(vocab_size, hidden_size)
        self.bias = nn.Parameter(torch.empty(vocab_size), requires_grad=False) if bias else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().forward(hidden)
        return logits + self.bias if self.bias is not None else logits


def with_mscale(cfg: dict[str, Any]) -> dict[str, Any]:
    """cfg with the longrope dict's attention factor set to the short or long mscale (module doc)."""
    theta, scaling = rope_params_from_config(cfg)
    if scaling is None or scaling.get("rope_type") != "longrope":
        return cfg
    original = scaling["original_max_position_embeddings"]
    max_len = cfg.get("max_model_len") or cfg.get("max_position_embeddings", original)
    mscale = scaling.get("long_mscale") if max_len > original else scaling.get("short_mscale")
    if mscale is not None:
        scaling["attention_factor"] = float(mscale)
    return {**cfg, "rope_scaling": None, "rope_theta": theta, "rope_parameters": scaling}


class PhiMoEForCausalLM(MoECausalLM):
    model_cls = PhimoeModel

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        if cfg.get("tie_word_embeddings"):
            raise ModelLoadError("Phi-MoE with tied embeddings is not supported")
        super().__init__(with_mscale(cfg), backend)
        self.lm_head = PhimoeLMHead(cfg["vocab_size"], cfg["hidden_size"], bool(cfg.get("lm_head_bias", False)))
