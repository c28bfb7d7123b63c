"""Write a float Hugging Face checkpoint as a standard GGUF file, quantized with our encoders.

The file is laid out as llama.cpp's `convert_hf_to_gguf.py` + `llama-quantize` would write it, so
llama.cpp loads it and so does mistralpy with no other input (tokenizer and chat template inside):

* architectures: Llama / Mistral -> `llama` (q/k rows permuted for llama.cpp's rope), Qwen2 ->
  `qwen2`, Qwen3 -> `qwen3`; tensor names are the inverse of our GGUF loader's tables.
* types: the decoder's linear weights take the export type (K-quants fall back for narrow rows as
  llama.cpp does, `isq.type_for_width`); the token embedding takes Q8_0 when the export type has
  fewer bits (as llama.cpp's `--token-embedding-type q8_0` and the "_XL" mixes keep it), an untied
  LM head Q8_0 (`isq.head_type`), norms and biases F32. F16 / BF16 / F32 export every matrix as is.
* streaming: tensor infos are computed from the safetensors headers first, then each tensor is read
  (memory-mapped), encoded, written and dropped, so peak memory is about one float tensor plus its
  encoding. The file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors import safe_open

from mistralpy.errors import InvalidRequestError, ModelLoadError, UnsupportedArchitectureError
from mistralpy.loading.gguf_loader import _GLOBAL_NAMES, _LAYER_NAMES
from mistralpy.loading.safetensors_reader import safetensors_files
from mistralpy.quant.gguf.dequant import BLOCK_SIZES
from mistralpy.quant.gguf.quantize import quantize
from mistralpy.quant.gguf.writer_tokenizer import add_tokenizer, read_tokenizer
from mistralpy.quant.isq import head_type, parse_isq, type_for_width

__all__ = ["EXPORT_ARCHITECTURES", "WriteSummary", "parse_export_type", "write_gguf"]

log = logging.getLogger(__name__)

# HF architecture -> (llama.cpp architecture, q/k rows permuted)
EXPORT_ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
FLOAT_TYPES: dict[str, Q] = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16}
_FTYPE: dict[Q, gguf.LlamaFileType] = {
    Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16, Q.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
    Q.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_S, Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S, Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    Q.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL, Q.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS,
}
_BITS: dict[Q, float] = {Q.Q2_K: 2.6, Q.Q3_K: 3.4, Q.Q4_0: 4.5, Q.Q4_1: 5, Q.Q4_K: 4.5, Q.IQ4_NL: 4.5,
                         Q.IQ4_XS: 4.25, Q.Q5_0: 5.5, Q.Q5_1: 6, Q.Q5_K: 5.5, Q.Q6_K: 6.6, Q.Q8_0: 8.5,
                         Q.F16: 16, Q.BF16: 16, Q.F32: 32}
_HF_TO_GGUF_GLOBAL = {hf.removesuffix(".weight"): g.removesuffix(".weight") for g, hf in _GLOBAL_NAMES.items()}
_HF_TO_GGUF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}
_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_export_type(name: str) -> Q:
    """F32 / F16 / BF16, or an ISQ name (Q4K, Q8_0, bits...) as `isq.parse_isq` reads it."""
    key = str(name).strip().upper()
    if key in FLOAT_TYPES:
        return FLOAT_TYPES[key]
    qtype = parse_isq(name)
    assert qtype is not None
    if not isinstance(qtype, Q):  # HQQ4 / HQQ8 / FP8
        raise InvalidRequestError(f"{qtype.name} is an ISQ type with its own storage, not a GGUF block format: "
                                  "it cannot be written to a GGUF file (use it with --isq when loading, or "
                                  "export a GGUF type such as Q4K or Q8_0)", "isq")
    if qtype == Q.Q8_K:
        raise InvalidRequestError("Q8K (ggml's Q8_K) is an activation format llama.cpp cannot multiply weights "
                                  "with: export Q8_0 instead", "isq")
    return qtype


@dataclass(slots=True)
class _Planned:
    """One output tensor: where it comes from and how it is encoded."""
    gguf_name: str
    shape: tuple[int, ...]  # logical [rows, cols] or [n]
    qtype: Q
    source: str | None  # HF name (None: generated, see `data`)
    file: Path | None = None
    permute_heads: int = 0  # llama arch q/k: rows permuted for rope
    data: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        bs, ts = BLOCK_SIZES[self.qtype]
        return math.prod(self.shape) // bs * ts


@dataclass(slots=True)
class WriteSummary:
    path: Path
    tensors: int
    type_counts: dict[str, int]
    size_bytes: int
    seconds: float

    def line(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.type_counts.items(), key=lambda kv: -kv[1]))
        return (f"wrote {self.path}: {self.tensors} tensors ({types}), {self.size_bytes / 2**20:.1f} MiB "
                f"in {self.seconds:.1f} s")


# ---------------------------------------------------------------------------------- config
def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling dict or None) from transformers 5 `rope_parameters` or older `rope_scaling`."""
    params = cfg.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return theta, (None if kind in (None, "default") else {**scaling, "rope_type": kind})


def _llama3_rope_factors(cfg: dict[str, Any], theta: float, rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1 rope scaling, computed as llama.cpp's converter does."""
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _add_hparams(w: gguf.GGUFWriter, cfg: dict[str, Any], arch: str, qtype: Q, name: str) -> torch.Tensor | None:
    """Every hyper-parameter llama.cpp reads for these architectures; returns rope_freqs if any."""
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    w.add_name(name)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(_FTYPE[qtype])
    w.add_vocab_size(int(cfg["vocab_size"]))
    w.add_context_length(int(cfg.get("max_position_embeddings", 4096)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    theta, rope = _rope(cfg)
    w.add_rope_freq_base(theta)
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True) and arch == "llama":
        log.warning("sliding_window=%s is written but llama.cpp's llama architecture ignores it",
                    cfg["sliding_window"])
        w.add_sliding_window(int(cfg["sliding_window"]))
    if rope is None:
        return None
    kind = rope["rope_type"]
    if kind == "llama3":
        return _llama3_rope_factors(cfg, theta, rope, head_dim)
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"rope scaling {kind!r} cannot be written to GGUF (supported: linear, yarn, llama3)")
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(rope["factor"]))
    if kind == "yarn":
        orig = rope.get("original_max_position_embeddings") or cfg.get("max_position_embeddings")
        w.add_rope_scaling_orig_ctx_len(int(orig))
        if rope.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(rope["beta_fast"]))
        if rope.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(rope["beta_slow"]))
    return None


# ---------------------------------------------------------------------------------- tensor plan
def _gguf_name(hf_name: str) -> str | None:
    """HF parameter name -> GGUF tensor name (None: not a tensor of these models)."""
    stem, _, kind = hf_name.rpartition(".")
    if stem in _HF_TO_GGUF_GLOBAL:
        return f"{_HF_TO_GGUF_GLOBAL[stem]}.{kind}"
    parts = stem.split(".", 3)  # model.layers.N.rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _HF_TO_GGUF_LAYER:
        return f"blk.{parts[2]}.{_HF_TO_GGUF_LAYER[parts[3]]}.{kind}"
    return None


def _float_type(export: Q) -> Q:
    """Matrices that no block type fits keep this float type."""
    return export if export in FLOAT_TYPES.values() else Q.F16


def _tensor_type(gguf_name: str, shape: tuple[int, ...], export: Q) -> Q:
    if len(shape) == 1:
        return Q.F32  # norms and biases, as llama.cpp keeps them
    if export in FLOAT_TYPES.values():
        return export
    if gguf_name == "token_embd.weight":
        wanted = Q.Q8_0 if _BITS[export] < 8 else export
    elif gguf_name == "output.weight":
        wanted = head_type(export)
    else:
        wanted = export
    return type_for_width(wanted, shape[-1]) or _float_type(export)


def _plan(files: list[Path], cfg: dict[str, Any], permute: bool, export: Q) -> list[_Planned]:
    tied = bool(cfg.get("tie_word_embeddings", False))
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    plan: list[_Planned] = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                if name.endswith(_SKIP_SUFFIXES) or (tied and name == "lm_head.weight"):
                    continue
                gname = _gguf_name(name)
                if gname is None:
                    raise ModelLoadError(f"checkpoint tensor {name!r} has no GGUF name for this architecture")
                shape = tuple(int(d) for d in f.get_slice(name).get_shape())
                p = _Planned(gname, shape, _tensor_type(gname, shape, export), name, path)
                if permute and ".attn_q." in gname:
                    p.permute_heads = heads
                elif permute and ".attn_k." in gname:
                    p.permute_heads = kv_heads
                plan.append(p)
    if not any(p.gguf_name == "token_embd.weight" for p in plan):
        raise ModelLoadError("the checkpoint has no model.embed_tokens.weight")
    return plan


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row permutation (per head: rotate-half halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _encode(w: torch.Tensor, qtype: Q) -> np.ndarray:
    """A float tensor -> the bytes GGUF stores for it."""
    if qtype == Q.F32:
        return w.to(torch.float32).contiguous().numpy()
    if qtype == Q.F16:
        return w.to(torch.float16).contiguous().numpy()
    if qtype == Q.BF16:
        return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return quantize(w, qtype).numpy()


def _iter_tensors(plan: list[_Planned]) -> Iterator[tuple[_Planned, torch.Tensor]]:
    """(planned, float tensor) in plan order, keeping one safetensors file open at a time."""
    handle, handle_path = None, None
    try:
        for p in plan:
            if p.data is not None:
                yield p, p.data
                continue
            if p.file != handle_path:
                if handle is not None:
                    handle.__exit__(None, None, None)
                handle, handle_path = safe_open(str(p.file), framework="pt").__enter__(), p.file
            yield p, handle.get_tensor(p.source)
    finally:
        if handle is not None:
            handle.__exit__(None, None, None)


# ---------------------------------------------------------------------------------- entry point
def _read_config(model_dir: Path, arch_override: str | None) -> tuple[dict[str, Any], str, bool]:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    hf_arch = arch_override or (cfg.get("architectures") or [None])[0]
    if hf_arch not in EXPORT_ARCHITECTURES:
        raise UnsupportedArchitectureError(f"cannot write {hf_arch!r} as GGUF; supported: "
                                           f"{', '.join(EXPORT_ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"hidden_act {cfg['hidden_act']!r}: llama.cpp's {hf_arch} graph uses silu")
    arch, permute = EXPORT_ARCHITECTURES[hf_arch]
    return cfg, arch, permute


def write_gguf(model_dir: str | Path, out: str | Path, qtype: str | Q, *, arch: str | None = None,
               name: str | None = None, overwrite: bool = False) -> WriteSummary:
    """Write the HF checkpoint in `model_dir` to `out` with matrices encoded as `qtype` (see module doc)."""
    start = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out)
    export = parse_export_type(qtype) if isinstance(qtype, str) else Q(qtype)
    if export not in _FTYPE:
        raise InvalidRequestError(f"cannot export as {export.name}", "isq")
    if out.exists() and not overwrite:
        raise InvalidRequestError(f"{out} exists (pass --force to overwrite it)", "output")
    cfg, gguf_arch, permute = _read_config(model_dir, arch)
    tok = read_tokenizer(model_dir, cfg, int(cfg["vocab_size"]))
    plan = _plan(safetensors_files(model_dir), cfg, permute, export)

    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), gguf_arch)
    try:
        rope_freqs = _add_hparams(w, cfg, gguf_arch, export, name or model_dir.name)
        if rope_freqs is not None:
            plan.insert(0, _Planned("rope_freqs.weight", tuple(rope_freqs.shape), Q.F32, None, data=rope_freqs))
        add_tokenizer(w, tok)
        for p in plan:
            # A non-uint8 dtype keeps `shape` as the logical shape; raw_dtype sets the GGML type.
            w.add_tensor_info(p.gguf_name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for p, tensor in _iter_tensors(plan):
            if p.permute_heads:
                tensor = _permute_rows(tensor, p.permute_heads)
            w.write_tensor_data(_encode(tensor, p.qtype))
            log.debug("%s %s %s", p.gguf_name, p.qtype.name, p.shape)
            del tensor
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    counts: dict[str, int] = {}
    for p in plan:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    return WriteSummary(out, len(plan), counts, out.stat().st_size, time.perf_counter() - start)
