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
    "PhiForCausalLM": ("phi", "PhiForCausalLM"),
    "Phi3ForCausalLM": ("phi3", "Phi3ForCausalLM"),
    "Starcoder2ForCausalLM": ("starcoder2", "Starcoder2ForCausalLM"),
    "Glm4ForCausalLM": ("glm4", "Glm4ForCausalLM"),
    "SmolLM3ForCausalLM": ("smollm3", "SmolLM3ForCausalLM"),
    "GemmaForCausalLM": ("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("gemma2", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("gemma3", "Gemma3ForCausalLM"),
    "Gemma3ForConditionalGeneration": ("gemma3_vision", "Gemma3ForConditionalGeneration"),
    "MixtralForCausalLM": ("mixtral", "MixtralForCausalLM"),
    "Qwen3MoeForCausalLM": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "PhiMoEForCausalLM": ("phimoe", "PhiMoEForCausalLM"),
    "PhimoeForCausalLM": ("phimoe", "PhiMoEForCausalLM"),  # transformers' spelling
    "DeepseekV2ForCausalLM": ("deepseek_v2", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("deepseek_v2", "DeepseekV3ForCausalLM"),
    "LlavaForConditionalGeneration": ("llava", "LlavaForConditionalGeneration"),
    "LlavaNextForConditionalGeneration": ("llava_next", "LlavaNextForConditionalGeneration"),
    "Mistral3ForConditionalGeneration": ("mistral3", "Mistral3ForConditionalGeneration"),
    "MllamaForConditionalGeneration": ("mllama", "MllamaForConditionalGeneration"),
    "Qwen3VLForConditionalGeneration": ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl", "Qwen3VLMoeForConditionalGeneration"),
    "Idefics2ForConditionalGeneration": ("idefics2", "Idefics2ForConditionalGeneration"),
    "Idefics3ForConditionalGeneration": ("idefics3", "Idefics3ForConditionalGeneration"),
    "SmolVLMForConditionalGeneration": ("idefics3", "SmolVLMForConditionalGeneration"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration"),
    "Llama4ForConditionalGeneration": ("llama4", "Llama4ForConditionalGeneration"),
    "Llama4ForCausalLM": ("llama4_text", "Llama4ForCausalLM"),
}

# Embedding and scoring models (mistralpy/embed): they pool hidden states instead of generating, so
# they stay out of _REGISTRY, which the README's generation table (models/support.py) is built from.
_EMBEDDING_REGISTRY: dict[str, tuple[str, str]] = {
    "BertModel": ("bert", "BertModel"),
    "BertForMaskedLM": ("bert", "BertModel"),
    "BertForSequenceClassification": ("bert", "BertForSequenceClassification"),
    "MPNetModel": ("mpnet", "MPNetModel"),
    "MPNetForMaskedLM": ("mpnet", "MPNetForMaskedLM"),
    "XLMRobertaModel": ("xlm_roberta", "XLMRobertaModel"),
    "XLMRobertaForMaskedLM": ("xlm_roberta", "XLMRobertaModel"),
    "XLMRobertaForSequenceClassification": ("xlm_roberta", "XLMRobertaForSequenceClassification"),
    "RobertaModel": ("xlm_roberta", "XLMRobertaModel"),
    "Qwen3Model": ("qwen3_embedding", "Qwen3EmbeddingModel"),
    "Gemma3TextModel": ("gemma3_embedding", "Gemma3TextModel"),
}


def _known(arch: str) -> bool:  # (read at each call: tests patch _REGISTRY)
    return arch in _REGISTRY or arch in _EMBEDDING_REGISTRY


def supported_architectures() -> list[str]:
    return sorted({*_REGISTRY, *_EMBEDDING_REGISTRY})


def resolve_architecture(hf_config: dict, override: str | None = None) -> str:
    if override:
        arch = override
    else:
        archs = hf_config.get("architectures") or []
        arch = next((a for a in archs if _known(a)), archs[0] if archs else None)
        if arch is None:
            raise UnsupportedArchitectureError(
                "config.json has no `architectures`; pass arch=... (one of " + ", ".join(supported_architectures()) + ")")
    if not _known(arch):
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported; supported: {', '.join(supported_architectures())}")
    return arch


def get_model_class(arch: str) -> type:
    module_name, class_name = _REGISTRY.get(arch) or _EMBEDDING_REGISTRY[arch]
    module = importlib.import_module(f"mistralpy.models.{module_name}")
    return getattr(module, class_name)
