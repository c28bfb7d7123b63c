"""GGUF `phi3` (Phi-3 / 3.5 / Phi-4): fused `attn_qkv` and `ffn_up` (= gate_up_proj, gate first)
load as they are; partial rotary from `rope.dimension_count`.

Long-context files carry longrope as metadata (`rope.scaling.original_context_length`,
`rope.scaling.attn_factor`) plus two F32 tensors `rope_factors_long` / `rope_factors_short` of
rotary_dim/2 values. The config cannot hold tensor values when it is built, so it gets a longrope
scaling with placeholder factors and the model swaps in the tensors' values while loading
(models/phi3.py). `sliding_window` 0 means none (llama.cpp's converter writes 0 for Phi-4).
"""
from __future__ import annotations

from typing import Any

from mistralpy.loading.gguf_families.phi import partial_rotary_factor

GLOBAL_NAMES = {
    "rope_factors_long.weight": "model.rope_factors_long",
    "rope_factors_short.weight": "model.rope_factors_short",
}
LAYER_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    factor = partial_rotary_factor(get, cfg["head_dim"])
    cfg["partial_rotary_factor"] = factor
    original = get("rope.scaling.original_context_length")
    if original is not None:
        cfg["original_max_position_embeddings"] = int(original)
    if "rope_factors_long.weight" in tensor_names:
        half = int(cfg["head_dim"] * factor) // 2
        scaling: dict[str, Any] = {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [1.0] * half}
        if get("rope.scaling.attn_factor") is not None:
            scaling["attention_factor"] = float(get("rope.scaling.attn_factor"))
        cfg["rope_scaling"] = scaling
