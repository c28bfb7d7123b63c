"""mistral.rs's ``Which`` model selector and its enums, with the same names, fields and defaults.

Each variant turns into ``(model, engine options)`` for our Engine through ``engine_args``. Variants
of features we do not have yet (adapters, vision, diffusion, speech, GGML) are accepted as values
and refused with ``UnsupportedModelKindError`` when a Runner tries to load them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from mistralpy.errors import InvalidRequestError, ModelLoadError

log = logging.getLogger(__name__)


class UnsupportedModelKindError(ModelLoadError, NotImplementedError):
    """A mistral.rs model kind (``Which`` variant) or Runner feature that mistral.py does not implement yet."""


class Architecture(Enum):
    """mistral.rs's text architectures; the value is the Hugging Face class name they select."""

    Mistral = "MistralForCausalLM"
    Gemma = "GemmaForCausalLM"
    Mixtral = "MixtralForCausalLM"
    Llama = "LlamaForCausalLM"
    Phi2 = "PhiForCausalLM"
    Phi3 = "Phi3ForCausalLM"
    Qwen2 = "Qwen2ForCausalLM"
    Gemma2 = "Gemma2ForCausalLM"
    GLM4 = "Glm4ForCausalLM"
    Starcoder2 = "Starcoder2ForCausalLM"
    Phi3_5MoE = "PhiMoEForCausalLM"
    DeepseekV2 = "DeepseekV2ForCausalLM"
    DeepseekV3 = "DeepseekV3ForCausalLM"
    Qwen3 = "Qwen3ForCausalLM"
    Qwen3Moe = "Qwen3MoeForCausalLM"
    SmolLm3 = "SmolLM3ForCausalLM"


class VisionArchitecture(Enum):
    Phi3V = "phi3v"
    Idefics2 = "idefics2"
    LLaVaNext = "llava_next"
    LLaVa = "llava"
    VLlama = "vllama"
    Qwen2VL = "qwen2vl"
    Idefics3 = "idefics3"
    MiniCpmO = "minicpmo"
    Phi4MM = "phi4mm"
    Qwen2_5VL = "qwen2_5vl"
    Gemma3 = "gemma3"
    Mistral3 = "mistral3"
    Llama4 = "llama4"
    Gemma3n = "gemma3n"


class DiffusionArchitecture(Enum):
    Flux = "flux"
    FluxOffloaded = "flux-offloaded"


class SpeechLoaderType(Enum):
    Dia = "dia"


class ModelDType(Enum):
    Auto = "auto"
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"


class IsqOrganization(Enum):
    Default = "default"
    MoQE = "moqe"


def arch_class_name(arch: Architecture | str | None) -> str | None:
    """Architecture enum, its name or value ("llama", "Llama", "LlamaForCausalLM") -> HF class name."""
    if arch is None or isinstance(arch, Architecture):
        return None if arch is None else arch.value
    for a in Architecture:
        if str(arch).lower() in (a.name.lower(), a.value.lower()):
            return a.value
    return str(arch)  # an HF class name we do not list: the model registry decides


def _dtype(dtype: ModelDType | str | None) -> str:
    if dtype is None:
        return "auto"
    value = dtype.value if isinstance(dtype, ModelDType) else str(dtype).lower()
    if value not in {d.value for d in ModelDType}:
        raise InvalidRequestError(f"dtype must be one of auto, bf16, f16, f32; got {dtype!r}", "dtype")
    return value


def _tokenizer_dir(tokenizer_json: str | None) -> str | None:
    # Our tokenizer option takes a folder (tokenizer.json + tokenizer_config.json) or a hub id.
    if tokenizer_json and Path(tokenizer_json).expanduser().is_file():
        return str(Path(tokenizer_json).expanduser().parent)
    return tokenizer_json


def _common(which: Any, options: dict[str, Any]) -> None:
    if getattr(which, "from_uqff", None) or getattr(which, "write_uqff", None):
        raise UnsupportedModelKindError("UQFF files are not supported by mistral.py; use in_situ_quant= or GGUF")
    if getattr(which, "imatrix", None) or getattr(which, "calibration_file", None):
        log.warning("imatrix / calibration_file are ignored: ISQ quantizes without an importance matrix")
    if getattr(which, "organization", None) not in (None, "default", IsqOrganization.Default):
        log.warning("ISQ organization %r is ignored (every linear layer is quantized)", which.organization)
    if getattr(which, "topology", None):
        options["topology"] = which.topology
    options["dtype"] = _dtype(getattr(which, "dtype", None))


class Which:
    """Which model to load: ``Which.Plain(model_id=...)``, ``Which.GGUF(quantized_model_id=...,
    quantized_filename=...)``; the other variants exist so scripts import, and are refused on load."""

    @dataclass
    class Plain:
        model_id: str
        arch: Architecture | str | None = None
        tokenizer_json: str | None = None
        topology: str | None = None
        organization: IsqOrganization | str | None = None
        from_uqff: str | list[str] | None = None
        write_uqff: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None
        calibration_file: str | None = None
        imatrix: str | None = None
        hf_cache_path: str | None = None

        def engine_args(self) -> tuple[str, dict[str, Any]]:
            options: dict[str, Any] = {"arch": arch_class_name(self.arch),
                                       "tokenizer": _tokenizer_dir(self.tokenizer_json)}
            _common(self, options)
            return self.model_id, options

    @dataclass
    class GGUF:
        quantized_model_id: str
        quantized_filename: str | list[str]
        tok_model_id: str | None = None
        topology: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None

        def engine_args(self) -> tuple[str, dict[str, Any]]:
            # A split GGUF is named by its first part; the loader finds the others next to it.
            filename = self.quantized_filename
            if isinstance(filename, (list, tuple)):
                filename = min(filename)
            options: dict[str, Any] = {"gguf_file": filename, "tokenizer": _tokenizer_dir(self.tok_model_id)}
            _common(self, options)
            return self.quantized_model_id, options

    @dataclass
    class Lora:
        adapter_model_id: str
        arch: Architecture | str | None = None
        model_id: str | None = None
        tokenizer_json: str | None = None
        topology: str | None = None
        from_uqff: str | list[str] | None = None
        write_uqff: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None
        hf_cache_path: str | None = None

    @dataclass
    class XLora:
        xlora_model_id: str
        order: str
        arch: Architecture | str | None = None
        model_id: str | None = None
        tokenizer_json: str | None = None
        tgt_non_granular_index: int | None = None
        topology: str | None = None
        from_uqff: str | list[str] | None = None
        write_uqff: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None
        hf_cache_path: str | None = None

    @dataclass
    class LoraGGUF:
        quantized_model_id: str
        quantized_filename: str | list[str]
        adapters_model_id: str
        order: str
        tok_model_id: str | None = None
        topology: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None

    @dataclass
    class XLoraGGUF:
        quantized_model_id: str
        quantized_filename: str | list[str]
        xlora_model_id: str
        order: str
        tok_model_id: str | None = None
        tgt_non_granular_index: int | None = None
        topology: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None

    @dataclass
    class GGML:
        quantized_model_id: str
        quantized_filename: str
        tok_model_id: str | None = None
        tokenizer_json: str | None = None
        gqa: int | None = None
        topology: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None

    @dataclass
    class LoraGGML:
        quantized_model_id: str
        quantized_filename: str
        adapters_model_id: str
        order: str
        tok_model_id: str | None = None
        tokenizer_json: str | None = None
        topology: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None

    @dataclass
    class XLoraGGML:
        quantized_model_id: str
        quantized_filename: str
        xlora_model_id: str
        order: str
        tok_model_id: str | None = None
        tgt_non_granular_index: int | None = None
        tokenizer_json: str | None = None
        gqa: int | None = None
        topology: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        auto_map_params: Any = None

    @dataclass
    class VisionPlain:
        model_id: str
        arch: VisionArchitecture | str | None = None
        tokenizer_json: str | None = None
        topology: str | None = None
        from_uqff: str | list[str] | None = None
        write_uqff: str | None = None
        dtype: ModelDType | str = ModelDType.Auto
        max_edge: int | None = None
        auto_map_params: Any = None
        calibration_file: str | None = None
        imatrix: str | None = None
        hf_cache_path: str | None = None

    @dataclass
    class DiffusionPlain:
        model_id: str
        arch: DiffusionArchitecture | str | None = None
        dtype: ModelDType | str = ModelDType.Auto

    @dataclass
    class Speech:
        model_id: str
        arch: SpeechLoaderType | str | None = None
        dac_model_id: str | None = None
        dtype: ModelDType | str = ModelDType.Auto

    @dataclass
    class Embedding:
        model_id: str
        arch: Any = None   # compat/embedding.EmbeddingArchitecture, its value, or an HF class name
        tokenizer_json: str | None = None
        topology: str | None = None
        write_uqff: str | None = None
        from_uqff: str | list[str] | None = None
        dtype: ModelDType | str = ModelDType.Auto
        hf_cache_path: str | None = None
        imatrix: str | None = None
        calibration_file: str | None = None

        def engine_args(self) -> tuple[str, dict[str, Any]]:
            from mistralpy.compat.embedding import embedding_class_name

            options: dict[str, Any] = {"arch": embedding_class_name(self.arch),
                                       "tokenizer": _tokenizer_dir(self.tokenizer_json)}
            _common(self, options)
            return self.model_id, options


_WHY = {
    "Lora": "LoRA adapters", "XLora": "X-LoRA adapters", "LoraGGUF": "LoRA adapters", "XLoraGGUF": "X-LoRA adapters",
    "GGML": "GGML files (convert them to GGUF)", "LoraGGML": "GGML files", "XLoraGGML": "GGML files",
    "VisionPlain": "vision models", "DiffusionPlain": "image generation (diffusion) models",
    "Speech": "speech generation models",
}


def engine_args(which: Any) -> tuple[str, dict[str, Any]]:
    """``(model, Engine options)`` for a Which value; UnsupportedModelKindError for the variants we lack."""
    name = type(which).__name__
    if name in _WHY:
        raise UnsupportedModelKindError(
            f"Which.{name} is not supported yet: mistral.py does not implement {_WHY[name]}; "
            "use Which.Plain or Which.GGUF")
    if not hasattr(which, "engine_args"):
        raise InvalidRequestError(f"which must be a Which variant (Which.Plain, Which.GGUF, ...), got {which!r}",
                                  "which")
    model, options = which.engine_args()
    return model, {k: v for k, v in options.items() if v is not None}
