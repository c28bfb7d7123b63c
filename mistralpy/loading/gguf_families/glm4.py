"""GGUF `glm4` (GLM-4-0414): norms after attention (`post_attention_norm`) and after the MLP
(`post_ffw_norm`), `ffn_up` holding gate_up_proj (gate first), biased q/k/v (or one `attn_qkv`),
partial rotary from `rope.dimension_count`. llama.cpp rotates adjacent pairs for this arch and its
converter keeps HF's q/k row order, so the model's own load-time reordering applies unchanged.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mistralpy.loading.gguf_families.phi import partial_rotary_factor, split_qkv
from mistralpy.quant.gguf.tensor import GGUFTensor

LAYER_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",  # split into q/k/v below
    "ffn_up": "mlp.gate_up_proj",
    "post_attention_norm": "post_self_attn_layernorm",
    "post_ffw_norm": "post_mlp_layernorm",
}


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    cfg["partial_rotary_factor"] = partial_rotary_factor(get, cfg["head_dim"])
    cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names or "blk.0.attn_qkv.bias" in tensor_names


def convert(name: str, tensor: GGUFTensor, cfg: dict[str, Any]) -> Iterator[tuple[str, GGUFTensor]]:
    if ".qkv_proj." in name:
        yield from split_qkv(name, tensor, cfg)
    else:
        yield name, tensor
