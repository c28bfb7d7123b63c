"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``):
a SigLIP tower with NaViT-style embeddings (multimodal/encoders/siglip.py), a connector (pixel
shuffle by ``scale_factor``, then one bias-free projection) and any of our text models (SmolVLM:
Llama / SmolLM2; Idefics3-8B: Llama 3). Each tile of an image (grid tiles, then the global image:
multimodal/processors/idefics3.py) gives (patches / scale_factor^2) rows, in the order of the
item's ``<image>`` slots; the row / column markers between them keep their own embeddings.

Checkpoint names (transformers 4 and 5 alike): ``model.vision_model.*``, ``model.connector.
modality_projection.proj.weight``, ``model.text_model.*``, ``lm_head.weight``. The two
architectures are the same network; SmolVLM's processor differs only in its defaults.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.errors import ModelLoadError
from mistralpy.layers.linear import Linear
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.models.llava import TEXT_ARCHS
from mistralpy.models.registry import get_model_class
from mistralpy.multimodal.encoders.siglip import (
    SiglipVisionTransformer,
    map_siglip_name,
    patch_mask_from_pixels,
    siglip_config,
)

# transformers' Idefics3VisionConfig / SmolVLMVisionConfig defaults (for configs that leave keys out).
VISION_DEFAULTS: dict[str, Any] = {"hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
                                   "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32}
TOP_DEFAULTS: dict[str, Any] = {"scale_factor": 2, "image_token_id": 128257, "tie_word_embeddings": False}
# model types a multimodal config's text part may name beyond llava's list
_MORE_TEXT = {"qwen3": "Qwen3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3_text": "Gemma3ForCausalLM", "mistral": "MistralForCausalLM"}


def text_class_by_type(text_cfg: dict[str, Any]) -> type:
    """Our class for a multimodal config's text part: by model_type first (SmolVLM's configs name
    unregistered architectures such as VLlama3ForCausalLM), else its ``architectures``."""
    arch = {**TEXT_ARCHS, **_MORE_TEXT}.get(text_cfg.get("model_type") or "llama")
    candidates = [arch] if arch else []
    candidates += list(text_cfg.get("architectures") or [])
    for name in candidates:
        try:
            return get_model_class(name)
        except KeyError:
            continue
    raise ModelLoadError(f"unsupported language model {text_cfg.get('model_type')!r} in a multimodal checkpoint")


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, S*S, D] -> [B, S*S / scale^2, D * scale^2]: each scale x scale block of patches becomes one
    row (transformers' Idefics3Connector.pixel_shuffle, same memory order)."""
    b, seq, dim = x.shape
    side = int(seq ** 0.5)
    if side * side != seq or side % scale:
        raise ValueError(f"pixel shuffle: {seq} patches is not a square grid divisible by {scale}")
    x = x.view(b, side, side // scale, dim * scale).permute(0, 2, 1, 3)
    x = x.reshape(b, side // scale, side // scale, dim * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(b, seq // (scale * scale), dim * scale * scale)


class Idefics3SimpleMLP(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = Linear(in_dim, out_dim, bias=False)


class Idefics3Connector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, scale: int) -> None:
        super().__init__()
        self.scale_factor = scale
        self.modality_projection = Idefics3SimpleMLP(vision_hidden * scale * scale, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.modality_projection.proj(pixel_shuffle(x, self.scale_factor))


class Idefics3ForConditionalGeneration(VisionLanguageModel):
    isq_skip_prefixes = ("vision_model.", "connector.")

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        cfg = {**TOP_DEFAULTS, **cfg}
        vcfg = siglip_config(cfg.get("vision_config") or {}, VISION_DEFAULTS)
        # transformers ties the LM head by the top-level flag (PreTrainedModel reads config.tie_word_embeddings)
        tcfg = {**cfg["text_config"], "tie_word_embeddings": bool(cfg["tie_word_embeddings"])}
        self.vision_model = SiglipVisionTransformer(vcfg, variable_resolution=True)
        self.connector = Idefics3Connector(vcfg["hidden_size"], tcfg["hidden_size"], int(cfg["scale_factor"]))
        self.adopt_text_model(text_class_by_type(tcfg)(tcfg, backend))

    @staticmethod
    def complete_config(hf_config: dict[str, Any]) -> dict[str, Any]:
        """Family defaults filled in (the engine and the processor read sizes before the model exists)."""
        vision = siglip_config(hf_config.get("vision_config") or {}, VISION_DEFAULTS)
        return {**TOP_DEFAULTS, **hf_config, "vision_config": vision}

    # ---- the contract of the model runner ------------------------------------------------------
    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's rows for the language model: [tiles * image_seq_len, text hidden], tile by tile."""
        dev = self.vision_model.embeddings.patch_embedding.weight.device
        pixels = item.inputs["pixel_values"].to(dev)
        pixel_mask = item.inputs.get("pixel_attention_mask")
        patch_mask = None
        if pixel_mask is not None:
            patch_mask = patch_mask_from_pixels(pixel_mask.to(dev), self.vision_model.patch_size)
        rows = self.connector(self.vision_model(pixels, patch_mask))
        return rows.reshape(-1, rows.shape[-1])

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        return map_idefics_name(self.language_model, name.removeprefix("model."))


def map_idefics_name(language_model: Any, name: str) -> str | None:
    """Idefics2 / Idefics3 / SmolVLM's saved names (``model.`` already removed): the SigLIP tower,
    the text model through its family's mapping, the head; anything else (the connector) as is."""
    if name.startswith("lm_head."):
        return "language_model." + name
    if name.startswith("vision_model."):
        inner = map_siglip_name(name[len("vision_model."):])
        return None if inner is None else "vision_model." + inner
    if name.startswith("text_model."):
        inner = language_model.map_weight_name("model." + name[len("text_model."):])
        return None if inner is None else "language_model." + inner
    return name


class SmolVLMForConditionalGeneration(Idefics3ForConditionalGeneration):
    """SmolVLM (1 and 2): the Idefics3 network under another name."""
