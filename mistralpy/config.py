"""EngineConfig = ModelConfig + CacheConfig + SchedulerConfig + DeviceConfig.

Built once by the Engine from user options and the checkpoint's config.json; every other
component reads from it and nothing mutates it after start-up.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mistralpy.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "f16": torch.float16, "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "f32": torch.float32, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InvalidRequestError(f"unknown device {device!r}", "device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' requested but CUDA is not available", "device")
    return dev


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 / AMX); else bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """`auto` never picks f16 on CPU: it is ~100x slower than f32 there."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise InvalidRequestError(f"dtype must be auto, bf16, f16 or f32, got {dtype!r}", "dtype") from None
    if device.type == "cuda":
        if checkpoint_dtype in ("float16", "float32") and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        # bf16 halves the bytes read per token and has native matmuls on AVX512-BF16 CPUs.
        if checkpoint_dtype in ("bfloat16", "float16") and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    return torch.float32


@dataclass(slots=True)
class ModelConfig:
    """What the model runner needs to build and run the model."""

    path: Path
    hf_config: dict[str, Any]
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    generation_config: dict[str, Any] = field(default_factory=dict)
    gguf_files: list[Path] | None = None  # weights come from these GGUF parts instead of safetensors
    # The builder's open readers of gguf_files (parsing a GGUF's metadata takes seconds): the loader
    # reads the tensors from them and drops them.
    gguf_readers: list[Any] | None = None
    isq: Any = None  # a GGMLQuantizationType: quantize linear weights to it while loading
    topology: Any = None  # quant.topology.Topology: per-layer ISQ types
    isq_vision: bool = False  # ISQ also quantizes vision towers and projectors (kept float by default)
    progress: Any = None  # loading.model_loader.ProgressFn: told as each tensor loads

    @property
    def text_config(self) -> dict[str, Any]:
        return self.hf_config.get("text_config") or self.hf_config

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])

    @property
    def num_layers(self) -> int:
        return int(self.text_config["num_hidden_layers"])

    @property
    def num_attention_heads(self) -> int:
        return int(self.text_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        cfg = self.text_config
        return int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None          # None: derived from kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # None: a device-dependent default
    enable_prefix_caching: bool = True


@dataclass(slots=True)
class SchedulerConfig:
    max_seqs: int = 32
    max_num_batched_tokens: int = 512  # token budget per step; prompts longer than this are chunked
    enable_chunked_prefill: bool = True


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: torch.device
    seed: int | None = None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def derive_max_model_len(text_cfg: dict[str, Any], user_value: int | None) -> int:
    limit = text_cfg.get("max_position_embeddings") or text_cfg.get("n_positions") or 4096
    if user_value is not None:
        if user_value < 1:
            raise InvalidRequestError("max_model_len must be >= 1", "max_model_len")
        return int(user_value)
    return int(limit)
