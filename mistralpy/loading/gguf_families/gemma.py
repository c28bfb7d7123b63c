"""GGUF hooks of the Gemma family (llama.cpp archs `gemma`, `gemma2`, `gemma3`).

What llama.cpp's converter and loader do differently from the common table:

- Norm weights are stored as 1 + w (the converter adds Gemma's RMSNorm offset); our norms add it
  themselves, so 1 is taken off again on load.
- Gemma 2/3 name the norm before the MLP `ffn_norm` and have `post_attention_norm` / `post_ffw_norm`;
  in Gemma 1, `ffn_norm` is the (HF) `post_attention_layernorm`, as in Llama.
- Hyper-parameters the file does not carry are llama.cpp's fixed rules: sliding layers every other
  layer (Gemma 2, window 4096 by default) or five of every six (Gemma 3), a local rope base of 10000
  (Gemma 3, unless `rope.freq_base_swa` says otherwise), and queries scaled by 1/sqrt(head_dim)
  except for the 27B models (46 / 62 layers), which use 1/sqrt(hidden / heads).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mistralpy.quant.gguf.tensor import GGUFTensor

LAYER_NAMES = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}

# llama.cpp: block counts of the 27B models, whose queries are scaled by hidden / heads.
_SCALE_BY_HIDDEN = {"gemma2": 46, "gemma3": 62}
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}


def _layer_types(arch: str, n_layers: int, pattern: Any) -> list[str]:
    """llama.cpp's per-layer choice: a bool array (true = sliding) or a period whose last layer is global."""
    if isinstance(pattern, list) and len(pattern) == n_layers:
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    period = int(pattern) if isinstance(pattern, (int, float)) and pattern else _SWA_PATTERN[arch]
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layers)]


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    arch = cfg["model_type"]
    cfg["hidden_act"] = cfg["hidden_activation"] = "gelu_pytorch_tanh"
    if arch == "gemma":
        return
    n_layers, head_dim = cfg["num_hidden_layers"], cfg["head_dim"]
    scale_by_hidden = n_layers == _SCALE_BY_HIDDEN[arch]
    cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // cfg["num_attention_heads"] if scale_by_hidden else head_dim
    final_cap = get("final_logit_softcapping")
    if arch == "gemma2":
        cfg["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = float(final_cap if final_cap is not None else 30.0)
        cfg["sliding_window"] = int(get("attention.sliding_window") or 4096)
    else:
        cfg["final_logit_softcapping"] = float(final_cap) if final_cap else None
        # Local and global layers rotate with their own bases; a rope scaling applies to global ones only.
        full = {"rope_type": "default", **(cfg.pop("rope_scaling", None) or {}), "rope_theta": cfg["rope_theta"]}
        local = {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0))}
        cfg["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        if not cfg.get("sliding_window"):  # llama.cpp: no window key, every layer global
            cfg["layer_types"] = ["full_attention"] * n_layers
            return
    cfg["layer_types"] = _layer_types(arch, n_layers, get("attention.sliding_window_pattern"))


def convert(name: str, tensor: GGUFTensor, cfg: dict[str, Any]) -> Iterator[tuple[str, GGUFTensor | torch.Tensor]]:
    if cfg["model_type"] == "gemma" and ".pre_feedforward_layernorm." in name:
        name = name.replace(".pre_feedforward_layernorm.", ".post_attention_layernorm.")
    if name.endswith("norm.weight"):
        yield name, tensor.to_float(torch.float32) - 1.0  # the file holds 1 + w
        return
    yield name, tensor
