"""GGUF `deepseek2` (DeepSeek V2, V2-Lite, V2.5, V3, R1; llama.cpp uses one architecture for all).

Config. llama.cpp writes MLA as MQA over the latent: ``attention.key_length`` = kv_lora_rank + rope
and ``value_length`` = kv_lora_rank, with the per-head widths in ``key_length_mla`` /
``value_length_mla`` (files from before llama.cpp's MLA support have only the per-head widths under
the plain keys). ``attention.q_lora_rank`` absent or 0 means a direct q projection (V2-Lite).
The router: ``expert_gating_func`` 1 softmax (V2; also the default when the key is missing, as
llama.cpp assumes for old V2 files) or 2 sigmoid (V3, with ``exp_probs_b`` as the score-correction
bias); ``expert_group_count`` / ``expert_group_used_count`` the group limit; ``expert_weights_norm``
and ``expert_weights_scale``. Sigmoid files load as DeepseekV3ForCausalLM.

Yarn: llama.cpp stores ``rope.scaling.yarn_log_multiplier`` = 0.1 * mscale_all_dim (the softmax
scale's mscale) and rotates with an attention factor of 1 (it assumes mscale == mscale_all_dim, as
every DeepSeek config has it); we set those explicitly.

Tensors. Routed experts come stacked (``ffn_{gate,up,down}_exps`` [E, out, in]) and are split per
expert (rows of each expert are whole blocks, so quantized bytes split as they are). kv_b_proj is
either one ``attn_kv_b`` or, from newer converters, ``attn_k_b`` [H, L, nope] (k part, transposed)
and ``attn_v_b`` [H, v, L]; those two are dequantized and joined back into kv_b_proj's float
[H * (nope + v), L] matrix, which is how the model uses it anyway (models/deepseek_v2.py).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from mistralpy.errors import ModelLoadError
from mistralpy.quant.gguf.tensor import GGUFTensor

LAYER_NAMES = {
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    "attn_k_b": "self_attn.k_b_proj",
    "attn_v_b": "self_attn.v_b_proj",
    "ffn_gate_inp": "mlp.gate",
    "exp_probs_b": "mlp.gate",  # blk.N.exp_probs_b.bias -> mlp.gate.bias, renamed in convert
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj",
    "ffn_down_shexp": "mlp.shared_experts.down_proj",
}

_SOFTMAX, _SIGMOID = 1, 2
# attn_k_b waiting for its layer's attn_v_b (or the other way round), keyed by layer prefix
_PENDING: dict[str, tuple[str, GGUFTensor]] = {}


def update_config(cfg: dict[str, Any], get: Any, meta: dict[str, Any], tensor_names: set[str]) -> None:
    rope = int(get("rope.dimension_count"))
    kv_lora = int(get("attention.kv_lora_rank"))
    if get("attention.key_length_mla") is not None:  # MLA-era converter
        qk_head = int(get("attention.key_length_mla"))
        v_head = int(get("attention.value_length_mla", qk_head - rope))
    else:
        qk_head = int(get("attention.key_length"))
        v_head = int(get("attention.value_length", qk_head - rope))
    q_lora = int(get("attention.q_lora_rank") or 0)
    gating = int(get("expert_gating_func") or _SOFTMAX)
    if gating not in (_SOFTMAX, _SIGMOID):
        raise ModelLoadError(f"deepseek2 expert_gating_func {gating} is not supported (1 softmax, 2 sigmoid)")
    n_group = int(get("expert_group_count") or 1)
    has_bias = any(n.endswith(".exp_probs_b.bias") for n in tensor_names)
    if gating == _SIGMOID:
        topk_method = "noaux_tc" if has_bias or n_group > 1 else "greedy"
    else:
        topk_method = "group_limited_greedy" if n_group > 1 else "greedy"
    cfg.update({
        "architectures": ["DeepseekV3ForCausalLM" if gating == _SIGMOID else "DeepseekV2ForCausalLM"],
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": kv_lora,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": qk_head - rope,
        "v_head_dim": v_head,
        "num_key_value_heads": cfg["num_attention_heads"],  # MLA expands the latent to every head
        "first_k_dense_replace": int(get("leading_dense_block_count") or 0),
        "moe_intermediate_size": int(get("expert_feed_forward_length") or cfg["intermediate_size"]),
        "n_routed_experts": int(get("expert_count") or 0) or None,
        "num_experts_per_tok": int(get("expert_used_count") or 0) or None,
        "n_shared_experts": int(get("expert_shared_count") or 0),
        "routed_scaling_factor": float(get("expert_weights_scale") or 1.0),
        "norm_topk_prob": bool(get("expert_weights_norm") or False),
        "scoring_func": "sigmoid" if gating == _SIGMOID else "softmax",
        "topk_method": topk_method,
        "n_group": n_group,
        "topk_group": int(get("expert_group_used_count") or n_group),
        "rope_interleave": True,
    })
    scaling = cfg.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type") == "yarn":
        scaling["attention_factor"] = 1.0
        log_mul = get("rope.scaling.yarn_log_multiplier")
        if log_mul:
            scaling["mscale"] = scaling["mscale_all_dim"] = float(log_mul) / 0.1


def _experts(name: str, tensor: GGUFTensor) -> Iterator[tuple[str, GGUFTensor]]:
    """mlp.experts.<proj>.weight [E, out, in] -> mlp.experts.<e>.<proj>.weight [out, in]."""
    prefix, proj, _ = name.rsplit(".", 2)
    num, out_features, in_features = tensor.shape
    rows = tensor.raw.reshape(num, out_features, -1)
    for e in range(num):
        yield f"{prefix}.{e}.{proj}.weight", GGUFTensor(rows[e], tensor.qtype, (out_features, in_features))


def _join_kv_b(k_b: GGUFTensor, v_b: GGUFTensor) -> torch.Tensor:
    """attn_k_b [H, L, nope] and attn_v_b [H, v, L] -> kv_b_proj [H * (nope + v), L] float32."""
    k = k_b.to_float(torch.float32).transpose(1, 2)  # [H, nope, L]
    v = v_b.to_float(torch.float32)
    return torch.cat((k, v), dim=1).reshape(-1, k.shape[-1]).contiguous()


def convert(name: str, tensor: GGUFTensor, cfg: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    if ".mlp.experts." in name and len(tensor.shape) == 3:
        yield from _experts(name, tensor)
    elif name.endswith(".mlp.gate.bias"):
        yield name[: -len("bias")] + "e_score_correction_bias", tensor
    elif ".self_attn.k_b_proj." in name or ".self_attn.v_b_proj." in name:
        layer = name.split(".self_attn.")[0]
        kind = "k" if ".k_b_proj." in name else "v"
        other = _PENDING.pop(layer, None)
        if other is None or other[0] == kind:
            _PENDING[layer] = (kind, tensor)
            return
        k_b, v_b = (tensor, other[1]) if kind == "k" else (other[1], tensor)
        yield f"{layer}.self_attn.kv_b_proj.weight", _join_kv_b(k_b, v_b)
    else:
        yield name, tensor
