"""GGUF `phi2` (Phi-1.5 / Phi-2): LayerNorms with bias, partial rotary, MLP fc1/fc2, biased head.

llama.cpp's converter writes q/k/v as `attn_q/k/v` from a transformers checkpoint and as one fused
`attn_qkv` from the original Microsoft one (most published Phi-2 GGUFs); both load. It stores the
rotated dims per head as `rope.dimension_count` and the LayerNorm eps as
`attention.layer_norm_epsilon`.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from mistralpy.quant.gguf.tensor import GGUFTensor

GLOBAL_NAMES = {
    "output_norm.weight": "model.final_layernorm.weight",
    "output_norm.bias": "model.final_layernorm.bias",
    "output.bias": "lm_head.bias",
}
LAYER_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",  # split into q/k/v below
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}


def partial_rotary_factor(get: Any, head_dim: int) -> float:
    """rope.dimension_count / head_dim, nudged so that HF's int(head_dim * factor) gives it back."""
    rotary_dim = int(get("rope.dimension_count", head_dim))
    factor = rotary_dim / head_dim
    while int(head_dim * factor) < rotary_dim:
        factor = math.nextafter(factor, math.inf)
    return factor


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    cfg["hidden_act"] = "gelu_new"
    cfg["layer_norm_eps"] = float(get("attention.layer_norm_epsilon", 1e-5))
    cfg["partial_rotary_factor"] = partial_rotary_factor(get, cfg["head_dim"])


def split_qkv(name: str, tensor: GGUFTensor, cfg: dict[str, Any]) -> Iterator[tuple[str, GGUFTensor]]:
    """A fused [q; k; v] tensor (weight or bias) as q_proj, k_proj and v_proj (row ranges)."""
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    for part, start, stop in (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)):
        yield name.replace(".qkv_proj.", f".{part}."), tensor.row_slice(start, stop)


def convert(name: str, tensor: GGUFTensor, cfg: dict[str, Any]) -> Iterator[tuple[str, GGUFTensor]]:
    if ".qkv_proj." in name:
        yield from split_qkv(name, tensor, cfg)
    else:
        yield name, tensor
