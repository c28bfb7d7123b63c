"""GGUF model files: hyper-parameters -> an HF-style config, tensors -> HF names and GGUFTensors.

One table (`GGUF_ARCHITECTURES`) maps llama.cpp's architecture names to our model classes; the
per-layer tensor names are mapped once (`_LAYER_NAMES`). Quantized tensors stay in their block
format (`GGUFTensor`); the layers decide how to use them (see layers/linear.py).

llama.cpp's converter permutes the rows of q and k of `llama`-arch models so that rope rotates
adjacent pairs; we undo it on load (rows are whole blocks, so this works on quantized bytes too).
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

from mistralpy.errors import ModelLoadError
from mistralpy.loading.gguf_file import GGUFFile
from mistralpy.quant.gguf.dequant import SUPPORTED_TYPES
from mistralpy.quant.gguf.tensor import GGUFTensor

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GGUFArch:
    hf_architecture: str
    permute_qk: bool  # rows of q/k were permuted by llama.cpp's converter
    # Module under mistralpy.loading.gguf_families with this family's hooks (see that package's
    # docstring): extra config keys, extra tensor names, tensors to split or adjust.
    family: str | None = None
    # Other architectures the family hook may pick from the metadata (Mixtral for `llama` files with
    # experts, DeepSeek V3 for `deepseek2` files with sigmoid gating): listed for the support table.
    also_builds: tuple[str, ...] = ()

    def hooks(self) -> Any:
        from mistralpy.loading.gguf_families import family_hooks

        return family_hooks(self.family)


# llama.cpp `general.architecture` -> our model. Grows with the model families.
GGUF_ARCHITECTURES: dict[str, GGUFArch] = {
    # the moe hook only acts on files with experts (Mixtral); dense llama files pass through
    "llama": GGUFArch("LlamaForCausalLM", permute_qk=True, family="moe", also_builds=("MixtralForCausalLM",)),
    "mistral": GGUFArch("MistralForCausalLM", permute_qk=True),
    "qwen2": GGUFArch("Qwen2ForCausalLM", permute_qk=False),
    # Qwen2-VL's language model: Qwen2 with M-RoPE sections (plain Qwen2 without its mmproj)
    "qwen2vl": GGUFArch("Qwen2ForCausalLM", permute_qk=False, family="qwen2vl"),
    "qwen3": GGUFArch("Qwen3ForCausalLM", permute_qk=False),
    "qwen3moe": GGUFArch("Qwen3MoeForCausalLM", permute_qk=False, family="moe"),
    "phi2": GGUFArch("PhiForCausalLM", permute_qk=False, family="phi"),
    "phi3": GGUFArch("Phi3ForCausalLM", permute_qk=False, family="phi3"),
    "starcoder2": GGUFArch("Starcoder2ForCausalLM", permute_qk=False, family="starcoder2"),
    "glm4": GGUFArch("Glm4ForCausalLM", permute_qk=False, family="glm4"),
    # llama.cpp's converter treats SmolLM3 as Llama (q/k permuted) and its loader fixes NoPE on every
    # 4th layer, the transformers default that our model applies when no_rope_layers is absent.
    "smollm3": GGUFArch("SmolLM3ForCausalLM", permute_qk=True),
    "gemma": GGUFArch("GemmaForCausalLM", permute_qk=False, family="gemma"),
    "gemma2": GGUFArch("Gemma2ForCausalLM", permute_qk=False, family="gemma"),
    "gemma3": GGUFArch("Gemma3ForCausalLM", permute_qk=False, family="gemma"),
    "deepseek2": GGUFArch("DeepseekV2ForCausalLM", permute_qk=False, family="deepseek",
                          also_builds=("DeepseekV3ForCausalLM",)),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
# Tensors llama.cpp writes that carry nothing our models need.
_SKIPPED = {"rope_freqs.weight"}
_SPLIT_RE = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")


def split_files(path: Path) -> list[Path]:
    """All parts of a split GGUF (`name-00001-of-00003.gguf`), else just `path`."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    stem, total = m.group(1), int(m.group(3))
    parts = [path.with_name(f"{stem}-{i:05d}-of-{total:05d}.gguf") for i in range(1, total + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelLoadError(f"split GGUF {path.name} is missing parts: {missing}")
    return parts


def open_readers(files: list[Path]) -> list[GGUFFile]:
    readers = []
    for f in files:
        try:
            readers.append(GGUFFile(f))
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a corrupt header raises struct/index errors
            raise ModelLoadError(f"cannot read GGUF file {f}: {exc}") from exc
    return readers


def metadata(reader: GGUFFile) -> dict[str, Any]:
    """Every key-value field of the file as Python values (token arrays included)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001 - an exotic field type must not stop loading
            log.debug("unreadable GGUF field %s", key)
    return out


def gguf_architecture(meta: dict[str, Any]) -> tuple[str, GGUFArch]:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: "
                             f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    return arch, GGUF_ARCHITECTURES[arch]


def hf_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """An HF config.json-style dict from GGUF hyper-parameters (what our models read)."""
    arch, info = gguf_architecture(meta)

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def need(key: str) -> Any:
        value = get(key)
        if value is None:
            raise ModelLoadError(f"GGUF file lacks {arch}.{key}")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []) or None
    if vocab is None:
        raise ModelLoadError("GGUF file gives no vocabulary size")
    cfg: dict[str, Any] = {
        "architectures": [info.hf_architecture],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    window = get("attention.sliding_window")
    if window:
        cfg["sliding_window"] = int(window)
    scaling = _rope_scaling(get)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    info.hooks().update_config(cfg, get, meta, tensor_names)
    return cfg


def apply_rope_freq_factors(cfg: dict[str, Any], readers: list[GGUFFile]) -> None:
    """Llama 3.x files carry their rope scaling as a `rope_freqs` tensor of per-frequency divisors
    instead of parameters. Recover the llama3 parameters that produce exactly those divisors (the
    converter computed them from factor / low / high frequency factors / original context), so the
    model runs the same rope as transformers; anything else is refused rather than run wrong."""
    tensor = next((t for r in readers for t in r.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return
    factors = torch.from_numpy(np.array(tensor.data, dtype=np.float32, copy=True)).reshape(-1)
    params = _llama3_params_for(factors, cfg["rope_theta"], cfg["head_dim"], cfg["max_position_embeddings"])
    if params is None:
        raise ModelLoadError("this GGUF's rope_freqs factors do not match a llama3 rope scaling; "
                             "other per-frequency rope factors are not supported yet")
    cfg["rope_scaling"] = params


def _llama3_params_for(factors: torch.Tensor, base: float, head_dim: int, max_pos: int) -> dict[str, Any] | None:
    from mistralpy.layers.rotary import _default_inv_freq, _llama3

    inv = _default_inv_freq(base, head_dim)
    if factors.numel() != inv.numel():
        return None
    factor = float(factors.max())
    wavelen = 2 * math.pi / inv
    medium = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    origs = {8192, 4096, 2048, 131072, max_pos}
    for low, high in ((1.0, 4.0), (1.0, 8.0), (2.0, 4.0)):
        # Each medium-band divisor pins the original context: 1/f = (1 - s) / factor + s,
        # s = (orig / wavelen - low) / (high - low).
        if medium.any() and factor > 1:
            smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
            origs.add(int(round(float((wavelen[medium] * (smooth * (high - low) + low)).median()))))
        for orig in sorted(origs):
            params = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                      "original_max_position_embeddings": orig}
            want = inv / _llama3(base, head_dim, params, max_pos)
            if torch.allclose(want.float(), factors, rtol=1e-4, atol=1e-5):
                return params
    return None


def _rope_scaling(get) -> dict[str, Any] | None:
    kind = get("rope.scaling.type")
    factor = get("rope.scaling.factor")
    if kind in (None, "none") or not factor or float(factor) == 1.0:
        return None
    if kind not in ("linear", "yarn"):
        raise ModelLoadError(f"GGUF rope scaling type {kind!r} is not supported (linear, yarn)")
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        orig = get("rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        for gguf_key, hf_key in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                                 ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if get(gguf_key) is not None:
                out[hf_key] = float(get(gguf_key))
    return out


def hf_tensor_name(name: str, arch: GGUFArch | None = None) -> str | None:
    """GGUF tensor name -> our (HF) parameter name; None for tensors we skip. Unknown names raise.

    A family's hooks may add names (``GLOBAL_NAMES`` / ``LAYER_NAMES``, same shapes as ours)."""
    hooks = arch.hooks() if arch is not None else None
    if name in _SKIPPED or (hooks is not None and name in hooks.SKIPPED):
        return None
    global_names = _GLOBAL_NAMES if hooks is None else {**_GLOBAL_NAMES, **hooks.GLOBAL_NAMES}
    if name in global_names:
        return global_names[name]
    m = _LAYER_RE.match(name)
    layer_names = _LAYER_NAMES if hooks is None else {**_LAYER_NAMES, **hooks.LAYER_NAMES}
    if m and m.group(2) in layer_names:
        return f"model.layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    raise ModelLoadError(f"GGUF tensor {name!r} has no place in this model")


def _unpermute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (per head: interleaved pairs -> rotate-half halves)."""
    n = rows.shape[0]
    rest = rows.shape[1:]
    return rows.reshape(n_head, n // n_head // 2, 2, *rest).transpose(1, 2).reshape(n, *rest).contiguous()


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    # The reader memory-maps the file read-only; a copy makes a normal tensor (one tensor at a time).
    return torch.from_numpy(np.array(arr, copy=True))


def iter_gguf_tensors(readers: list[GGUFFile], hf_config: dict[str, Any],
                      arch: GGUFArch) -> Iterator[tuple[str, GGUFTensor]]:
    """Yield (our parameter name, GGUFTensor) for every tensor of the (split) file.

    The family's ``convert`` hook sees each one and may rename, split or adjust it."""
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config["num_key_value_heads"]
    permute_qk = arch.permute_qk
    convert = arch.hooks().convert
    for reader in readers:
        for t in reader.tensors:
            name = hf_tensor_name(t.name, arch)
            if name is None:
                continue
            qtype = Q(t.tensor_type)
            if qtype not in SUPPORTED_TYPES:
                raise ModelLoadError(f"GGUF tensor {t.name} has type {qtype.name}, which is not supported")
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists the fastest dim first
            data = _as_tensor(t.data)
            raw = data.view(torch.uint8).reshape(shape[0], -1) if len(shape) > 1 else data.view(torch.uint8)
            if permute_qk and (name.endswith("q_proj.weight") or name.endswith("q_proj.bias")):
                raw = _unpermute_rows(raw.reshape(shape[0], -1), heads).reshape(raw.shape)
            elif permute_qk and (name.endswith("k_proj.weight") or name.endswith("k_proj.bias")):
                raw = _unpermute_rows(raw.reshape(shape[0], -1), kv_heads).reshape(raw.shape)
            yield from convert(name, GGUFTensor(raw, qtype, shape), hf_config)
