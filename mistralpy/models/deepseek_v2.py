"""DeepSeek V2 / V3: multi-head latent attention (MLA) over a compressed paged cache, and a
mixture of routed + shared experts with group-limited routing.

Follows transformers' modeling_deepseek_v2 / _v3 class order and parameter names.

MLA, absorbed form. Per token the cache holds one "head" of ``kv_lora_rank + qk_rope_head_dim``
channels: the normalised latent ``c_kv`` and the rotated shared ``k_pe``. The value cache is a
view of the latent channels of that same tensor (``v_in_k``), so a token costs
``(kv_lora_rank + rope) * layers`` elements instead of ``heads * (qk_head_dim + v_head_dim) * layers``.
``kv_b_proj`` (latent -> per-head k_nope and v) is folded into the query and the output instead of
being applied to every cached token:

    q_nope . (W_uk c) = (W_uk^T q_nope) . c        (query moved into latent space)
    sum_j p_j (W_uv c_j) = W_uv (sum_j p_j c_j)     (values projected after the weighted sum)

so attention is multi-query attention with key ``[c_kv, k_pe]`` and value ``c_kv`` through the
ordinary backend, with the softmax scale of the uncompressed head (qk_head_dim^-0.5 times yarn's
mscale^2). kv_b_proj therefore stays a float matrix (dequantized when the checkpoint is
quantized; ISQ leaves it alone), as it is used as two batched matrices, not as a Linear.

Rope. DeepSeek rotates interleaved pairs (x0, x1), (x2, x3), ...: V2 through complex products,
V3 (``rope_interleave``) by rotating the even/odd slices into neox halves. A dot product does not
change when q and k are permuted alike, so both are de-interleaved into neox order here and
rotated by the shared RotaryEmbedding (yarn included); k_pe is cached in that order.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.attention.backend import AttentionBackend, AttentionSpec
from mistralpy.layers.embedding import LMHead, VocabEmbedding
from mistralpy.layers.linear import Linear, default_weight_loader
from mistralpy.layers.moe import FusedExperts, split_all_fused_experts
from mistralpy.layers.norm import RMSNorm
from mistralpy.layers.rotary import get_rope, rope_params_from_config
from mistralpy.models.base import CausalLM
from mistralpy.models.llama import LlamaMLP, LlamaModel

# HF builds q_a_layernorm / kv_a_layernorm with the default eps, not rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def _is_moe_layer(cfg: dict[str, Any], layer_idx: int) -> bool:
    """Routed experts from layer first_k_dense_replace on, every moe_layer_freq-th layer."""
    if not cfg.get("n_routed_experts"):
        return False
    return layer_idx >= (cfg.get("first_k_dense_replace") or 0) and layer_idx % (cfg.get("moe_layer_freq") or 1) == 0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(cfg: dict[str, Any]) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under a scaled rope (HF yarn_apply_mscale)."""
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    _, params = rope_params_from_config(cfg)
    if params and params.get("mscale_all_dim"):
        m = _yarn_mscale(params["factor"], params["mscale_all_dim"])
        scale = scale * m * m
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """[..., (a0 b0 a1 b1 ...)] -> [..., (a0 a1 ... b0 b1 ...)]: interleaved pairs to neox halves."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class DeepseekV2TopkRouter(nn.Module):
    """Router scores in float32 -> (weights [T, k] float32, expert ids [T, k] int64).

    scoring_func softmax (V2) or sigmoid (V3). topk_method:
    - ``greedy``: top-k of the scores;
    - ``group_limited_greedy`` (V2): keep the topk_group groups with the highest max score, top-k inside;
    - ``noaux_tc`` (V3): choose with scores + e_score_correction_bias, groups ranked by the sum of
      their two best biased scores; the weights are the unbiased scores of the chosen experts.
    Then weights are renormalised if norm_topk_prob (and k > 1) and multiplied by
    routed_scaling_factor. (HF's V2 router ignores norm_topk_prob; no released V2 sets it. The rule
    here is V3's, llama.cpp's and vLLM's.)
    """

    def __init__(self, cfg: dict[str, Any], v3: bool) -> None:
        super().__init__()
        self.top_k = cfg["num_experts_per_tok"]
        self.num_experts = cfg["n_routed_experts"]
        self.scoring_func = cfg.get("scoring_func") or ("sigmoid" if v3 else "softmax")
        self.topk_method = cfg.get("topk_method") or ("noaux_tc" if v3 else "greedy")
        self.num_group = cfg.get("n_group") or 1
        self.topk_group = cfg.get("topk_group") or self.num_group
        self.norm_topk_prob = bool(cfg.get("norm_topk_prob", v3))
        self.routed_scaling_factor = float(cfg.get("routed_scaling_factor") or 1.0)
        # HF keeps the router in float32 whatever the model dtype (_keep_in_fp32_modules_strict).
        self.weight = nn.Parameter(torch.empty(self.num_experts, cfg["hidden_size"], dtype=torch.float32),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        if self.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts, dtype=torch.float32),
                                                        requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight)
        scores = logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if self.topk_method == "greedy":
            weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        else:
            noaux = self.topk_method == "noaux_tc"
            choice = scores + self.e_score_correction_bias if noaux else scores
            grouped = choice.view(-1, self.num_group, self.num_experts // self.num_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if noaux else grouped.max(dim=-1).values
            group_idx = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            keep = keep.repeat_interleave(self.num_experts // self.num_group, dim=1)
            # HF masks with 0 for V2's positive softmax scores and -inf for V3's biased ones
            choice = choice.masked_fill(~keep, float("-inf") if noaux else 0.0)
            if noaux:
                ids = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
                weights = scores.gather(1, ids)
            else:
                weights, ids = torch.topk(choice, self.top_k, dim=-1, sorted=False)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, ids


class DeepseekV2Moe(nn.Module):
    """Routed experts (``experts.{e}``, as HF names them) plus always-on shared experts."""

    def __init__(self, cfg: dict[str, Any], v3: bool) -> None:
        super().__init__()
        self.experts = FusedExperts(cfg["n_routed_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"],
                                    cfg.get("hidden_act", "silu"))
        self.gate = DeepseekV2TopkRouter(cfg, v3)
        n_shared = cfg.get("n_shared_experts") or 0
        self.shared_experts = LlamaMLP(cfg, cfg["moe_intermediate_size"] * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class LatentUpProjection(nn.Module):
    """kv_b_proj's weight [heads * (qk_nope + v), kv_lora_rank], kept float (quantized checkpoints are
    dequantized on load) and read as two per-head matrices: w_uk [H, qk_nope, L] and w_uv [H, v, L]."""

    def __init__(self, kv_lora_rank: int, num_heads: int, qk_nope_head_dim: int, v_head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.qk_nope_head_dim, self.v_head_dim = num_heads, qk_nope_head_dim, v_head_dim
        self.weight = nn.Parameter(torch.empty(num_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank),
                                   requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def per_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [T, H, qk_nope] -> latent-space query [T, H, L]."""
        w_uk, _ = self.per_head()
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def expand_output(self, latent_out: torch.Tensor) -> torch.Tensor:
        """Attention output in latent space [T, H, L] -> per-head values [T, H, v]."""
        _, w_uv = self.per_head()
        return torch.bmm(latent_out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)


class DeepseekV2Attention(nn.Module):
    """Multi-head latent attention over the compressed cache (see the module docstring)."""

    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend, v3: bool) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.q_lora_rank = cfg.get("q_lora_rank")
        self.kv_lora_rank = cfg["kv_lora_rank"]
        self.qk_nope_head_dim = cfg["qk_nope_head_dim"]
        self.qk_rope_head_dim = cfg["qk_rope_head_dim"]
        self.v_head_dim = cfg["v_head_dim"]
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        bias = bool(cfg.get("attention_bias", False))
        if self.q_lora_rank is None:  # V2-Lite: a direct projection
            self.q_proj = Linear(hidden, self.num_heads * self.qk_head_dim)
        else:
            self.q_a_proj = Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = LatentUpProjection(self.kv_lora_rank, self.num_heads, self.qk_nope_head_dim,
                                            self.v_head_dim)
        self.o_proj = Linear(self.num_heads * self.v_head_dim, hidden, bias=bias)
        base, scaling = rope_params_from_config(cfg)
        rd = self.qk_rope_head_dim
        self.rotary_emb = get_rope(rd, rd, int(cfg.get("max_position_embeddings", 4096)), base, scaling,
                                   torch.float32, max_model_len=cfg.get("max_model_len"))
        self.interleaved = bool(cfg.get("rope_interleave", True)) if v3 else True
        self.spec = AttentionSpec(scale=mla_softmax_scale(cfg))
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        t = hidden.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        q_nope, q_pe = q.view(t, self.num_heads, self.qk_head_dim).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent).unsqueeze(1)                      # [T, 1, L]
        k_pe = k_pe.unsqueeze(1)                                               # [T, 1, R]
        if self.interleaved:
            q_pe, k_pe = _deinterleave(q_pe), _deinterleave(k_pe)
        q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
        query = torch.cat((self.kv_b_proj.absorb_query(q_nope), q_pe), dim=-1)  # [T, H, L + R]
        key = torch.cat((latent, k_pe), dim=-1)                                # [T, 1, L + R]
        out = self.backend.forward(query, key, latent, kv_cache[0], kv_cache[1], attn_metadata, self.spec)
        out = self.kv_b_proj.expand_output(out)                                # [T, H, v]
        return self.o_proj(out.reshape(t, self.num_heads * self.v_head_dim))


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend, v3: bool) -> None:
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = DeepseekV2Attention(cfg, layer_idx, backend, v3)
        self.mlp = DeepseekV2Moe(cfg, v3) if _is_moe_layer(cfg, layer_idx) else LlamaMLP(cfg)  # dense layers (first_k_dense_replace)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), kv_cache, attn_metadata)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DeepseekV2Model(LlamaModel):
    """LlamaModel's forward over DeepSeek decoder layers (dense or MoE, chosen per layer)."""

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend, v3: bool) -> None:
        nn.Module.__init__(self)
        self.embed_tokens = VocabEmbedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(cfg, i, backend, v3)
                                    for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))


class DeepseekV2ForCausalLM(CausalLM):
    v3 = False
    stacked_params = (("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.model = DeepseekV2Model(cfg, backend, self.v3)
        tied = cfg.get("tie_word_embeddings", False)
        self.lm_head = LMHead(cfg["vocab_size"], cfg["hidden_size"], self.model.embed_tokens if tied else None)
        self.num_layers = len(self.model.layers)
        # The compressed cache: one head of [latent | k_pe]; v is the latent part of it.
        self.num_kv_heads = 1
        self.head_dim = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        self.v_cache_dim = cfg["kv_lora_rank"]
        self.v_in_k = True

    def map_weight_name(self, name: str) -> str | None:
        # V3 checkpoints carry the multi-token-prediction module as an extra layer: not used here
        if name.startswith("model.layers.") and int(name.split(".", 3)[2]) >= self.num_layers:
            return None
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(split_all_fused_experts(weights))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], attn_metadata: Any) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """V3: sigmoid router with a score-correction bias and group top-2-sum selection (noaux_tc),
    norm_topk_prob on by default; the rest is V2."""

    v3 = True
