"""Idefics2's perceiver resampler: ``n_latents`` learned rows that cross-attend, layer by layer, to
one frame's projected vision states and to themselves, giving a fixed number of rows per frame.

Each layer (transformers' Idefics2PerceiverLayer): RMSNorm the latents and the context apart; queries
from the latents, keys / values from [context ; latents] (grouped-query heads, no biases, no
positions); the context's padded patches are masked out as keys, the latents never are; residual;
RMSNorm, a SwiGLU MLP of 4 x hidden, residual. A final RMSNorm closes the stack.

Parameter names follow the checkpoint below ``connector.perceiver_resampler.``, except q / k / v:
``self_attn.q_proj`` loads as ``self_attn.q`` (see ``map_perceiver_name``) so the text model's
stacked_params (which fuse ``.q_proj.`` / ``.k_proj.`` / ``.v_proj.`` into ``qkv_proj``) leave
them alone: queries and keys read different inputs here. gate / up do fuse (``GatedMLP``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.layers.linear import Linear
from mistralpy.layers.mlp import GatedMLP
from mistralpy.layers.norm import RMSNorm

# transformers' Idefics2PerceiverConfig defaults
PERCEIVER_DEFAULTS: dict[str, Any] = {"hidden_act": "silu", "hidden_size": 4096, "rms_norm_eps": 1e-6,
                                      "resampler_n_latents": 64, "resampler_depth": 3, "resampler_n_heads": 16,
                                      "resampler_head_dim": 96, "num_key_value_heads": 4}


def perceiver_config(cfg: dict[str, Any], text_cfg: dict[str, Any]) -> dict[str, Any]:
    """The perceiver config with its defaults; as Idefics2Config does, a hidden size other than the
    text model's is taken as a left-out default and replaced by the text's size and RMSNorm eps."""
    out = {**PERCEIVER_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    out.pop("model_type", None)
    if out["hidden_size"] != text_cfg["hidden_size"]:
        out["hidden_size"] = text_cfg["hidden_size"]
        out["rms_norm_eps"] = text_cfg["rms_norm_eps"]
    if out["resampler_n_heads"] % out["num_key_value_heads"]:
        raise ValueError(f"perceiver: {out['resampler_n_heads']} heads is not a multiple of "
                         f"{out['num_key_value_heads']} key / value heads")
    return out


class PerceiverAttention(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.num_heads, self.num_kv_heads = cfg["resampler_n_heads"], cfg["num_key_value_heads"]
        self.head_dim = cfg["resampler_head_dim"]
        self.q = Linear(hidden, self.num_heads * self.head_dim)
        self.k = Linear(hidden, self.num_kv_heads * self.head_dim)
        self.v = Linear(hidden, self.num_kv_heads * self.head_dim)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """latents [B, L, H], context [B, S, H], key_mask [B, S + L] bool (True: attend) or None."""
        b, n, _ = latents.shape
        both = torch.cat([context, latents], dim=1)
        s = both.shape[1]
        q = self.q(latents).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(both).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(both).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        if group > 1:   # query head h reads key / value head h // group (transformers' repeat_kv)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class PerceiverLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.input_latents_norm = RMSNorm(hidden, eps)
        self.input_context_norm = RMSNorm(hidden, eps)
        self.self_attn = PerceiverAttention(cfg)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, 4 * hidden, cfg["hidden_act"])

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), key_mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """[B, S, H] context (+ [B, S] bool patch mask) -> [B, n_latents, H]."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        self.n_latents = cfg["resampler_n_latents"]
        self.latents = nn.Parameter(torch.empty(self.n_latents, hidden), requires_grad=False)
        self.layers = nn.ModuleList(PerceiverLayer(cfg) for _ in range(cfg["resampler_depth"]))
        self.norm = RMSNorm(hidden, cfg["rms_norm_eps"])

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = context.shape[0]
        latents = self.latents.to(context.dtype)[None].expand(b, -1, -1)
        key_mask = None
        if context_mask is not None and not bool(context_mask.all()):
            # the latents are always visible keys; padded patches never are
            key_mask = torch.cat([context_mask.bool(),
                                  torch.ones(b, self.n_latents, dtype=torch.bool, device=context.device)], dim=1)
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)


def map_perceiver_name(name: str) -> str:
    """A name below ``perceiver_resampler.`` -> ours (q / k / v projections renamed, see the module doc)."""
    for src, dst in (("self_attn.q_proj.", "self_attn.q."), ("self_attn.k_proj.", "self_attn.k."),
                     ("self_attn.v_proj.", "self_attn.v.")):
        name = name.replace(src, dst)
    return name


__all__ = ["PERCEIVER_DEFAULTS", "PerceiverResampler", "map_perceiver_name", "perceiver_config"]
