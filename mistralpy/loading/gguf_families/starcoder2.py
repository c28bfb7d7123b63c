"""GGUF `starcoder2`: LayerNorms with bias (`attention.layer_norm_epsilon`), biased projections,
MLP c_fc -> gelu_pytorch_tanh -> c_proj, head tied to the embedding when `output` is absent."""
from __future__ import annotations

from typing import Any

GLOBAL_NAMES = {"output_norm.bias": "model.norm.bias"}
LAYER_NAMES = {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"}


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    cfg["hidden_act"] = "gelu_pytorch_tanh"
    cfg["norm_epsilon"] = float(get("attention.layer_norm_epsilon", 1e-5))
    cfg["use_bias"] = "blk.0.attn_q.bias" in tensor_names
