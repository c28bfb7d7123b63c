"""GGUF files written from tiny random HF checkpoints, the way llama.cpp's converter lays them out.

`write_gguf` maps names with gguf's tensor-name tables, permutes q/k rows for the `llama` arch,
stores the byte-level BPE fixture tokenizer as a `gpt2` vocabulary (special tokens CONTROL) and
encodes weight matrices as F32/F16 or a type gguf can write (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1); norms
stay F32 as in llama.cpp. `llama_quantize` turns such a file into any llama.cpp type (K-quants
need row widths that are multiples of 256: use GGUF_BASE).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# A llama-shaped model whose widths suit every K-quant (multiples of 256).
GGUF_BASE = dict(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3"}


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


def write_gguf(hf_dir: Path, out: Path, weight_type: str = "F32") -> Path:
    """Convert the float32 HF checkpoint in hf_dir into a GGUF file storing matrices as weight_type."""
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
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if weight_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    _tokenizer_fields(w, hf_dir)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg["num_hidden_layers"])
    qtype = gguf.GGMLQuantizationType[weight_type]
    state = load_file(str(hf_dir / "model.safetensors"))
    for name, tensor in state.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        data = tensor.to(torch.float32).numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            data = _permute(data, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            data = _permute(data, kv_heads)
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise KeyError(f"no GGUF name for {name}")
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
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
