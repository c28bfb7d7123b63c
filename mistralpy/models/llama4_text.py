"""Llama 4's text model (transformers' modeling_llama4 ``Llama4TextModel`` / ``Llama4ForCausalLM``).

Per layer, from the config:
- RoPE layers (``no_rope_layers[i] == 1``): RoPE (llama3 scaling) on *interleaved* pairs
  (x[2i], x[2i+1]), then a weightless L2 RMSNorm on q and k (``use_qk_norm``), and chunked local
  attention (``attention_chunk_size``: a token sees the keys of its own chunk only, AttentionSpec's
  ``attention_chunk_size``). The interleaved rope runs as our rotate-half rope on q/k rows permuted
  at load (glm4.neox_row_order); q and k share the order, so every q.k is unchanged (the L2 norm
  too: it is permutation-invariant).
- NoPE layers: no rope, full causal attention, and attention temperature tuning: q is scaled by
  ``1 + attn_scale * log1p(floor((pos + 1) / floor_scale))`` at absolute position ``pos``.
- Feed-forward (``feed_forward``): MoE in ``moe_layers`` (default every ``interleave_moe_layer_step``-th
  layer): the router's top-k logits pass a sigmoid and scale each expert's *input* (not its output),
  plus an always-on shared expert; dense SwiGLU of ``intermediate_size_mlp`` elsewhere.

Checkpoint names: ``feed_forward.router.weight`` [E, H]; fused 3-D experts
``feed_forward.experts.gate_up_proj`` [E, H, 2I] (gate columns first) and ``.down_proj`` [E, I, H]
(bmm layout, transposed against nn.Linear), split per expert at load.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend, AttentionSpec
from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.layers.mlp import GatedMLP
from mistralpy.layers.moe import FusedExperts, Router
from mistralpy.layers.norm import RMSNorm
from mistralpy.layers.rotary import get_rope, rope_params_from_config
from mistralpy.models.base import cfg_get
from mistralpy.models.glm4 import _reorder_rows, neox_row_order
from mistralpy.models.llama import LlamaForCausalLM, LlamaModel


def uses_rope(cfg: dict[str, Any], layer_idx: int) -> bool:
    flags = cfg.get("no_rope_layers")
    if flags:
        return bool(flags[layer_idx])
    return (layer_idx + 1) % int(cfg.get("no_rope_layer_interval", 4)) != 0


def is_moe_layer(cfg: dict[str, Any], layer_idx: int) -> bool:
    layers = cfg.get("moe_layers")
    if layers is None:
        step = int(cfg.get("interleave_moe_layer_step", 1))
        layers = range(step - 1, cfg["num_hidden_layers"], step)
    return layer_idx in layers


def layer_chunk_size(cfg: dict[str, Any], layer_idx: int) -> int | None:
    """The attention chunk of one layer: ``layer_types`` when given, else chunked on RoPE layers."""
    chunk = cfg.get("attention_chunk_size")
    types = cfg.get("layer_types")
    if types is not None:
        return chunk if types[layer_idx] == "chunked_attention" else None
    return chunk if uses_rope(cfg, layer_idx) else None


def _l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama4TextL2Norm: x * rsqrt(mean(x^2) + eps) in float32, no weight."""
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Llama4TextExperts(FusedExperts):
    """Experts that take each token already scaled by its router score: expert(x * s), summed
    with weight 1 (Llama4TextMoe multiplies the inputs, and the experts are not linear)."""

    def run_experts(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        t, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of_row = order // k
        scores = topk_weights.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of_row[start:start + n]
            y = self[e](x.index_select(0, rows) * scores[start:start + n])
            out.index_add_(0, rows, y.float())
            start += n
        return out.to(x.dtype)


class Llama4TextMoe(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, act = cfg["hidden_size"], cfg.get("hidden_act", "silu")
        self.top_k = int(cfg.get("num_experts_per_tok", 1))
        num_experts = int(cfg["num_local_experts"])
        self.experts = Llama4TextExperts(num_experts, hidden, cfg["intermediate_size"], act)
        self.router = Router(hidden, num_experts)
        self.shared_expert = GatedMLP(hidden, cfg["intermediate_size"], act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top.float()).to(logits.dtype)   # as Llama4Router, in the logits' dtype
        routed = self.experts(x, scores, ids)
        return self.shared_expert(x) + routed


class Llama4TextAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg_get(cfg, "num_key_value_heads", default=self.num_heads)
        self.head_dim = cfg_get(cfg, "head_dim", default=hidden // self.num_heads)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(cfg.get("attention_bias", False))
        self.qkv_proj = MergedLinear(hidden, [self.q_size, self.kv_size, self.kv_size], bias=bias)
        self.o_proj = Linear(self.q_size, hidden, bias=bias)
        self.use_rope = uses_rope(cfg, layer_idx)
        self.qk_norm = bool(cfg.get("use_qk_norm", True)) and self.use_rope
        self.eps = float(cfg.get("rms_norm_eps", 1e-5))
        self.temperature_tuning = bool(cfg.get("attn_temperature_tuning", True)) and not self.use_rope
        self.floor_scale = float(cfg.get("floor_scale", 8192))
        self.attn_scale = float(cfg.get("attn_scale", 0.1))
        self.rotary_emb = None
        if self.use_rope:
            base, scaling = rope_params_from_config(cfg)
            self.rotary_emb = get_rope(self.head_dim, self.head_dim, int(cfg.get("max_position_embeddings", 4096)),
                                       base, scaling, torch.float32, max_model_len=cfg.get("max_model_len"))
        self.spec = AttentionSpec(scale=self.head_dim ** -0.5, attention_chunk_size=layer_chunk_size(cfg, layer_idx))
        self.backend = backend

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        t = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        if self.qk_norm:
            q, k = _l2_norm(q, self.eps), _l2_norm(k, self.eps)
        if self.temperature_tuning:
            # log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1, float32 as transformers
            scale = torch.log1p(torch.floor((positions.float() + 1.0) / self.floor_scale)) * self.attn_scale + 1.0
            q = (q * scale.view(t, 1, 1)).to(q.dtype)
        out = self.backend.forward(q, k, v, kv_cache[0], kv_cache[1], attn_metadata, self.spec)
        return self.o_proj(out.reshape(t, self.q_size))


class Llama4TextDecoderLayer(nn.Module):
    """Not a LlamaDecoderLayer on purpose: the native decode loop must not take these layers."""

    def __init__(self, cfg: dict[str, Any], layer_idx: int, backend: AttentionBackend) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-5)
        self.self_attn = Llama4TextAttention(cfg, layer_idx, backend)
        self.is_moe_layer = is_moe_layer(cfg, layer_idx)
        if self.is_moe_layer:
            self.feed_forward: nn.Module = Llama4TextMoe(cfg)
        else:
            self.feed_forward = GatedMLP(hidden, cfg.get("intermediate_size_mlp", cfg["intermediate_size"]),
                                         cfg.get("hidden_act", "silu"))
        self.input_layernorm = RMSNorm(hidden, eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: Any) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), kv_cache, attn_metadata)
        return hidden + self.feed_forward(self.post_attention_layernorm(hidden))


class Llama4TextModel(LlamaModel):
    layer_cls = Llama4TextDecoderLayer


def split_llama4_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """``experts.gate_up_proj`` [E, H, 2I] / ``experts.down_proj`` [E, I, H] (bmm layout) ->
    per-expert nn.Linear-shaped ``experts.{e}.{gate,up,down}_proj.weight``."""
    prefix, _, leaf = name.rpartition(".")
    if not prefix.endswith(".experts") or not isinstance(tensor, torch.Tensor) or tensor.dim() != 3:
        yield name, tensor
        return
    if leaf == "gate_up_proj":
        inter = tensor.shape[-1] // 2
        for e, w in enumerate(tensor):
            yield f"{prefix}.{e}.gate_proj.weight", w[:, :inter].t()
            yield f"{prefix}.{e}.up_proj.weight", w[:, inter:].t()
    elif leaf == "down_proj":
        for e, w in enumerate(tensor):
            yield f"{prefix}.{e}.down_proj.weight", w.t()
    else:
        yield name, tensor


class Llama4ForCausalLM(LlamaForCausalLM):
    """The text-only model; also the language model inside Llama4ForConditionalGeneration."""

    model_cls = Llama4TextModel

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        attn = self.model.layers[0].self_attn
        self._q_order = neox_row_order(attn.num_heads, attn.head_dim, attn.head_dim)
        self._k_order = neox_row_order(attn.num_kv_heads, attn.head_dim, attn.head_dim)

    def prepare_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Split fused experts and permute q/k rows (interleaved rope -> rotate-half), every layer."""
        for name, tensor in weights:
            if name.endswith(("q_proj.weight", "q_proj.bias")) and ".self_attn." in name and "vision" not in name:
                tensor = _reorder_rows(tensor, self._q_order)
            elif name.endswith(("k_proj.weight", "k_proj.bias")) and ".self_attn." in name and "vision" not in name:
                tensor = _reorder_rows(tensor, self._k_order)
            yield from split_llama4_experts(name, tensor)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self.prepare_weights(weights))


__all__ = ["Llama4ForCausalLM", "Llama4TextModel", "Llama4TextMoe", "is_moe_layer", "layer_chunk_size",
           "uses_rope"]
