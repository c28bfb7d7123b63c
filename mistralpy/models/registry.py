"""HF `architectures` name -> model class, imported lazily so start-up loads one family only."""
from __future__ import annotations

import importlib

from mistralpy.errors import UnsupportedArchitectureError

# architecture -> (module under mistralpy.models, class name)
_REGISTRY: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def resolve_architecture(hf_config: dict, override: str | None = None) -> str:
    if override:
        arch = override
    else:
        archs = hf_config.get("architectures") or []
        arch = next((a for a in archs if a in _REGISTRY), archs[0] if archs else None)
        if arch is None:
            raise UnsupportedArchitectureError(
                "config.json has no `architectures`; pass arch=... (one of " + ", ".join(supported_architectures()) + ")")
    if arch not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}")
    return arch


def get_model_class(arch: str) -> type:
    module_name, class_name = _REGISTRY[arch]
    module = importlib.import_module(f"mistralpy.models.{module_name}")
    return getattr(module, class_name)
