"""GGUF files written from tiny random HF checkpoints, the way llama.cpp's converter lays them out.

`write_gguf` maps names with gguf's tensor-name tables, permutes q/k rows for the `llama` arch,
stores the byte-level BPE fixture tokenizer as a `gpt2` vocabulary (special tokens CONTROL) and
encodes weight matrices as F32/F16 or a type gguf can write (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); norms
stay F32 as in llama.cpp. `llama_quantize` turns such a file into any llama.cpp type (K-quants
need row widths that are multiples of 256: use GGUF_BASE).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

# A llama-shaped model whose widths suit every K-quant (multiples of 256).
GGUF_BASE = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3", "PhiForCausalLM": "phi2", "Phi3ForCausalLM": "phi3",
         "Starcoder2ForCausalLM": "starcoder2", "Glm4ForCausalLM": "glm4", "SmolLM3ForCausalLM": "smollm3"}
_ARCH |= {"GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}
_ARCH |= {"MixtralForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3moe"}
_ARCH |= {"DeepseekV2ForCausalLM": "deepseek2", "DeepseekV3ForCausalLM": "deepseek2"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (rotate-half halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(writer, hf_dir: Path) -> None:
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    size = max(max(vocab.values()), max(added.values(), default=0)) + 1
    tokens = [""] * size
    types = [1] * size
    for text, i in vocab.items():
        tokens[i] = text
    for text, i in added.items():
        tokens[i] = text
        types[i] = 3  # CONTROL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab.get(cfg["eos_token"], added.get(cfg["eos_token"])))
    writer.add_pad_token_id(added.get(cfg["pad_token"], 0))
    writer.add_add_bos_token(False)
    if cfg.get("chat_template"):
        writer.add_chat_template(cfg["chat_template"])


def _phi3_fields(writer, cfg: dict, rope: dict, rotary_dim: int) -> None:
    """What llama.cpp's Phi3MiniModel adds: the original context, the window (0 = none) and, for
    longrope, the attention factor and both factor lists as F32 tensors."""
    orig = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
    writer.add_rope_scaling_orig_ctx_len(orig)
    writer.add_sliding_window(cfg.get("sliding_window") or 0)
    if rope.get("long_factor"):
        assert len(rope["long_factor"]) == rotary_dim // 2
        scale = cfg["max_position_embeddings"] / orig
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))


def _gemma_fields(writer, cfg: dict, arch: str) -> None:
    """What llama.cpp's Gemma converters add: soft-caps and the window (Gemma 2 / 3); for Gemma 3
    the global layers' rope base and scaling (local layers use llama.cpp's fixed base of 10000)."""
    import gguf

    if arch == "gemma2":
        writer.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(cfg["sliding_window"])
    if arch == "gemma3":
        full = cfg["rope_parameters"]["full_attention"]
        writer.add_rope_freq_base(full["rope_theta"])  # overwrites the common (flat) rope_theta
        if full.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
        if cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(cfg["final_logit_softcapping"])


def _fused_qkv(state: dict) -> dict:
    """q_proj / k_proj / v_proj of each layer joined row-wise into one qkv_proj (weights and biases)."""
    out = {}
    for name, tensor in state.items():
        if ".q_proj." in name:
            parts = [state[name.replace(".q_proj.", f".{p}.")] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace(".q_proj.", ".qkv_proj.")] = torch.cat(parts)
        elif ".k_proj." not in name and ".v_proj." not in name:
            out[name] = tensor
    return out


def _moe_fields(writer, cfg: dict, arch: str) -> None:
    """Expert counts (and Qwen3-MoE's expert width) as llama.cpp's converter writes them."""
    writer.add_expert_count(cfg.get("num_local_experts") or cfg["num_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    if arch == "qwen3moe":
        writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])


def _stacked_experts(state: dict) -> dict:
    """Per-expert tensors `<block>.experts.{e}.<proj>.weight` stacked into one [E, out, in] tensor
    `<block>.experts.<proj>.weight` per projection (llama.cpp's `ffn_{gate,up,down}_exps`)."""
    import re

    out, groups = {}, {}
    for name, tensor in state.items():
        m = re.match(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if m is None:
            out[name] = tensor
        else:
            groups.setdefault(f"{m.group(1)}.{m.group(3)}.weight", {})[int(m.group(2))] = tensor
    for name, experts in groups.items():
        out[name] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def _deepseek2_fields(writer, cfg: dict, legacy_kv_b: bool) -> None:
    """What llama.cpp's DeepseekV2Model converter writes: MLA as MQA over the latent (key = latent +
    rope, value = latent, per-head widths under the `_mla` keys); legacy_kv_b: the pre-MLA layout
    (per-head widths under the plain keys, one attn_kv_b). Overwrites the generic head keys."""
    import gguf

    rope, latent, v_head = cfg["qk_rope_head_dim"], cfg["kv_lora_rank"], cfg["v_head_dim"]
    qk_head = cfg["qk_nope_head_dim"] + rope
    writer.add_rope_dimension_count(rope)
    # 0 = a direct attn_q (the converter omits the key; llama.cpp then needs V2-Lite's 26/27 layers)
    writer.add_q_lora_rank(cfg.get("q_lora_rank") or 0)
    writer.add_kv_lora_rank(latent)
    if legacy_kv_b:
        writer.add_head_count_kv(cfg["num_attention_heads"])
        writer.add_key_length(qk_head)
        writer.add_value_length(v_head)
    else:
        writer.add_head_count_kv(1)
        writer.add_key_length(latent + rope)
        writer.add_value_length(latent)
        writer.add_key_length_mla(qk_head)
        writer.add_value_length_mla(v_head)
    writer.add_leading_dense_block_count(cfg["first_k_dense_replace"])
    writer.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    writer.add_expert_count(cfg["n_routed_experts"])
    writer.add_expert_used_count(cfg["num_experts_per_tok"])
    writer.add_expert_shared_count(cfg["n_shared_experts"])
    writer.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    v3 = cfg["architectures"][0] == "DeepseekV3ForCausalLM"
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    if (cfg.get("n_group") or 1) > 1:
        writer.add_expert_group_count(cfg["n_group"])
        writer.add_expert_group_used_count(cfg["topk_group"])
    rope_params = cfg.get("rope_parameters") or {}
    if rope_params.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope_params["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope_params["original_max_position_embeddings"])
        if rope_params.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * rope_params["mscale_all_dim"])


def _deepseek2_state(state: dict, cfg: dict, legacy_kv_b: bool) -> dict:
    """kv_b_proj split into k_b_proj (k part transposed to [H, L, nope]) and v_b_proj [H, v, L] unless
    legacy_kv_b; the router's score-correction bias under the name llama.cpp maps to exp_probs_b."""
    out = {}
    heads, nope, v_head = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    for name, tensor in state.items():
        if name.endswith("e_score_correction_bias"):
            out[name.replace("e_score_correction_bias", "e_score_correction.bias")] = tensor
        elif name.endswith("kv_b_proj.weight") and not legacy_kv_b:
            k_b, v_b = tensor.view(heads, nope + v_head, -1).split([nope, v_head], dim=1)
            out[name.replace("kv_b_proj", "k_b_proj")] = k_b.transpose(1, 2).contiguous()
            out[name.replace("kv_b_proj", "v_b_proj")] = v_b.contiguous()
        else:
            out[name] = tensor
    return out


def write_gguf(hf_dir: Path, out: Path, weight_type: str = "F32", fuse_qkv: bool = False,
               legacy_kv_b: bool = False) -> Path:
    """Convert the float32 HF checkpoint in hf_dir into a GGUF file storing matrices as weight_type.

    fuse_qkv writes q/k/v as one `attn_qkv` (as llama.cpp does from original Phi-2 checkpoints);
    legacy_kv_b writes DeepSeek's kv_b_proj as one `attn_kv_b` (llama.cpp before MLA support)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = _ARCH[cfg["architectures"][0]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    # llama.cpp's phi2 converter writes 4 * n_embd whatever intermediate_size says
    w.add_feed_forward_length(4 * cfg["hidden_size"] if arch == "phi2" else cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    if arch in ("phi2", "starcoder2"):  # LayerNorm families
        w.add_layer_norm_eps(cfg.get("layer_norm_eps") or cfg["norm_epsilon"])
    else:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if arch == "phi3":
        _phi3_fields(w, cfg, rope, int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if weight_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    _tokenizer_fields(w, hf_dir)
    if arch.startswith("gemma"):
        _gemma_fields(w, cfg, arch)
    if arch == "deepseek2":
        _deepseek2_fields(w, cfg, legacy_kv_b)
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        _moe_fields(w, cfg, arch)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    qtype = gguf.GGMLQuantizationType[weight_type]
    state = load_file(str(hf_dir / "model.safetensors"))
    if fuse_qkv:
        state = _fused_qkv(state)
    state = _stacked_experts(state)  # no-op without experts
    if arch == "deepseek2":
        state = _deepseek2_state(state, cfg, legacy_kv_b)
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        data = tensor.to(torch.float32).numpy()
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0  # llama.cpp stores Gemma's (1 + w) norm weights
        if arch in ("llama", "smollm3") and name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif arch in ("llama", "smollm3") and name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise KeyError(f"no GGUF name for {name}")
        # llama.cpp keeps the MoE router (ffn_gate_inp) in F32
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or "ffn_gate_inp" in new_name:
            w.add_tensor(new_name, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(new_name, data.astype(np.float16))
        else:
            raw = gguf.quants.quantize(data, qtype)
            w.add_tensor(new_name, raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama_quantize(src: Path, dst: Path, ftype_name: str) -> Path:
    """llama.cpp's own quantizer (llama-cpp-python): ftype_name like 'Q4_K_M', 'Q6_K', 'IQ4_XS'."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {ftype_name} failed ({rc})")
    return dst


def llama_cpp_logits(path: Path, ids: list[int]) -> torch.Tensor:
    """llama.cpp's logits for every position of ids (float32 [len(ids), vocab])."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2,
                          verbose=False)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    finally:
        llm.close()
