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


def _tokenizer_fields(writer, hf_dir: Path, vocab_size: int = 0) -> None:
    """vocab_size: a larger embedding than the tokenizer pads the list with `[PAD{i}]` tokens
    (UNUSED), as llama.cpp's converter does (its loader wants one token per embedding row)."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    size = max(max(vocab.values()), max(added.values(), default=0)) + 1
    padded = max(size, vocab_size)
    tokens = [f"[PAD{i}]" for i in range(padded)]
    types = [1] * size + [5] * (padded - size)  # the padding is UNUSED
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
    _tokenizer_fields(w, hf_dir, cfg["vocab_size"])
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


# ---- LLaVA 1.5: a llama text GGUF + a llama.cpp mmproj (clip) GGUF ---------------------------------

def _llava_split(state: dict) -> tuple[dict, dict]:
    """An HF LLaVA state dict -> (text model tensors in LlamaForCausalLM names, vision + projector tensors
    as `vision_model.*` / `multi_modal_projector.*`), whichever of the saved layouts it uses."""
    text, vision = {}, {}
    for name, t in state.items():
        n = name.removeprefix("model.")
        if n.startswith("language_model.model."):
            text["model." + n[len("language_model.model."):]] = t
        elif n.startswith("language_model.lm_head.") or name.startswith("lm_head."):
            text["lm_head." + n.split("lm_head.", 1)[1]] = t
        elif n.startswith("language_model."):
            text["model." + n[len("language_model."):]] = t
        elif n.startswith("vision_tower."):
            inner = n[len("vision_tower."):]
            vision[inner if inner.startswith("vision_model.") else "vision_model." + inner] = t
        elif n.startswith("multi_modal_projector."):
            vision[n] = t
    return text, vision


def _mmproj_name(name: str) -> str | None:
    """HF CLIP / projector name -> llama.cpp's mmproj name (clip-impl.h TN_*), None for dropped ones."""
    import re

    if name.startswith("multi_modal_projector."):
        return name.replace("multi_modal_projector.linear_1.", "mm.0.").replace("multi_modal_projector.linear_2.", "mm.2.")
    n = name.removeprefix("vision_model.")
    fixed = {"embeddings.class_embedding": "v.class_embd", "embeddings.patch_embedding.weight": "v.patch_embd.weight",
             "embeddings.position_embedding.weight": "v.position_embd.weight",
             "pre_layrnorm.weight": "v.pre_ln.weight", "pre_layrnorm.bias": "v.pre_ln.bias"}
    if n in fixed:
        return fixed[n]
    if n.startswith("post_layernorm.") or n.endswith("position_ids"):
        return None   # the legacy converter drops post_layernorm for LLaVA
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", n)
    if m is None:
        raise KeyError(name)
    part = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
            "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}[m.group(2)]
    return f"v.blk.{m.group(1)}.{part}.{m.group(3)}"


def write_llava_gguf(hf_dir: Path, out_dir: Path, legacy_ffn_names: bool = False,
                     feature_layer_key: bool = True) -> tuple[Path, Path]:
    """An HF LLaVA 1.5 folder -> (`llava-text.gguf`, `mmproj-llava.gguf`), both F32, as llama.cpp's
    tools (convert_hf_to_gguf for the text, legacy-models/convert_image_encoder_to_gguf for the
    projector) lay them out: layers past the selected one dropped, post_layernorm dropped, the
    feature layer as a non-negative `clip.vision.feature_layer` (or absent: clip.cpp then runs
    block_count - 1 layers, so one more layer is kept). legacy_ffn_names: fc1/fc2 written as
    ffn_down/ffn_up, as that script does (clip.cpp swaps them back by shape)."""
    import shutil

    import gguf
    from safetensors.torch import load_file, save_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    state = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    text_state, vision_state = _llava_split(state)
    text_dir = out_dir / "text-hf"
    text_dir.mkdir(parents=True, exist_ok=True)
    tcfg = {**cfg["text_config"], "architectures": ["LlamaForCausalLM"]}
    (text_dir / "config.json").write_text(json.dumps(tcfg))
    save_file({k: v.contiguous() for k, v in text_state.items()}, str(text_dir / "model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(hf_dir / name, text_dir / name)
    text_path = write_gguf(text_dir, out_dir / "llava-text.gguf")

    vc = cfg["vision_config"]
    n = vc["num_hidden_layers"]
    layer = cfg.get("vision_feature_layer", -2)
    layer = layer if layer >= 0 else n + 1 + layer   # hidden_states index: 0 = embeddings
    keep = layer if feature_layer_key else layer + 1
    pp = json.loads((hf_dir / "preprocessor_config.json").read_text())
    w = gguf.GGUFWriter(str(out_dir / "mmproj-llava.gguf"), "clip")
    w.add_bool("clip.has_text_encoder", False)
    w.add_clip_has_vision_encoder(True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vision_image_size(vc["image_size"])
    w.add_vision_patch_size(vc["patch_size"])
    w.add_vision_embedding_length(vc["hidden_size"])
    w.add_vision_feed_forward_length(vc["intermediate_size"])
    w.add_vision_projection_dim(cfg["text_config"]["hidden_size"])
    w.add_vision_head_count(vc["num_attention_heads"])
    w.add_vision_attention_layernorm_eps(vc.get("layer_norm_eps", 1e-5))
    w.add_vision_block_count(keep)
    if feature_layer_key:
        w.add_array("clip.vision.feature_layer", [layer])
    w.add_vision_image_mean(list(pp["image_mean"]))
    w.add_vision_image_std(list(pp["image_std"]))
    w.add_vision_use_gelu(vc.get("hidden_act") == "gelu")
    for name, tensor in vision_state.items():
        new = _mmproj_name(name)
        if new is None:
            continue
        if new.startswith("v.blk.") and int(new.split(".")[2]) >= keep:
            continue
        if legacy_ffn_names and ".ffn_" in new:
            new = new.replace("ffn_up", "ffn_tmp").replace("ffn_down", "ffn_up").replace("ffn_tmp", "ffn_down")
        w.add_tensor(new, np.ascontiguousarray(tensor.to(torch.float32).numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return text_path, out_dir / "mmproj-llava.gguf"


def llama_cpp_mtmd(text_path: Path, mmproj_path: Path, prompt: str, image: np.ndarray) -> dict:
    """llama.cpp's multimodal path (libmtmd) on one prompt holding the default marker and one RGB
    uint8 image [H, W, 3]: the image chunk's embeddings (mtmd_encode_chunk + mtmd_get_output_embd),
    the text chunks' ids and the logits of the last position after evaluating every chunk."""
    import ctypes

    import llama_cpp
    from llama_cpp import mtmd_cpp as mtmd

    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(text_path).encode(), mparams)
    assert model, "llama.cpp could not load the text GGUF"
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 256, 256, 256
    cparams.n_threads = cparams.n_threads_batch = 2
    lctx = llama_cpp.llama_init_from_model(model, cparams)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.print_timings = False, 2, False, False
    ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, params)
    assert ctx, "libmtmd refused the mmproj file"
    h, w, _ = image.shape
    buf = np.ascontiguousarray(image, dtype=np.uint8)
    bitmap = mtmd.mtmd_bitmap_init(w, h, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        raw = prompt.encode()
        text = mtmd.mtmd_input_text(raw, len(raw), False, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1)
        assert rc == 0, f"mtmd_tokenize failed ({rc})"
        out: dict = {"chunks": []}
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        n_embd = llama_cpp.llama_model_n_embd(model)
        for i in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(ctx, chunk) == 0
                ptr = mtmd.mtmd_get_output_embd(ctx)
                out["image_embeds"] = torch.tensor(np.ctypeslib.as_array(ptr, shape=(n * n_embd,)).copy()).view(n, n_embd)
                out["chunks"].append(("image", n))
            else:
                n_tok = ctypes.c_size_t(0)
                ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n_tok))
                out["chunks"].append(("text", [ids[j] for j in range(n_tok.value)]))
        new_n_past = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 256, True, ctypes.byref(new_n_past))
        assert rc == 0, f"mtmd_helper_eval_chunks failed ({rc})"
        logits = llama_cpp.llama_get_logits_ith(lctx, -1)
        out["last_logits"] = torch.tensor(np.ctypeslib.as_array(logits, shape=(n_vocab,)).copy())
        out["n_past"] = new_n_past.value
        return out
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        mtmd.mtmd_free(ctx)
        llama_cpp.llama_free(lctx)
        llama_cpp.llama_model_free(model)
