"""LLaVA 1.5 (``LlavaForConditionalGeneration``): a CLIP vision tower, a two-layer projector and
any of our text models. Image rows replace the expanded ``<image>`` tokens' embeddings
(``embed_multimodal``; the model runner scatters them, multimodal/processors/llava.py expands).

Checkpoint names in every layout in use (tests/test_llava.py loads all three): what transformers
5.24 writes (``vision_tower.<CLIP transformer>``, ``multi_modal_projector``, ``language_model.model``,
``language_model.lm_head``), the llava-hf checkpoints' (``vision_tower.vision_model.*``, the rest
the same) and transformers 5's module names (``model.vision_tower``, ``model.language_model``,
``lm_head``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.errors import ModelLoadError
from mistralpy.layers.linear import Linear
from mistralpy.models.registry import get_model_class
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.multimodal.encoders.clip import VISION_ACTS, ClipVisionModel, map_vision_name

# text model_type -> our class for the language model
TEXT_ARCHS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM"}


def text_model_class(text_cfg: dict[str, Any]) -> type:
    archs = text_cfg.get("architectures") or [TEXT_ARCHS.get(text_cfg.get("model_type", "llama"), "")]
    try:
        return get_model_class(archs[0])
    except KeyError:
        raise ModelLoadError(f"unsupported language model {text_cfg.get('model_type')!r} in a multimodal checkpoint") from None


class LlavaProjector(nn.Module):
    def __init__(self, vision_hidden: int, text_hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = Linear(vision_hidden, text_hidden, bias=bias)
        self.act = VISION_ACTS.get(act) or torch.nn.functional.gelu
        self.linear_2 = Linear(text_hidden, text_hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(VisionLanguageModel):
    isq_skip_prefixes = ("vision_tower.", "multi_modal_projector.")

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        vcfg, tcfg = cfg["vision_config"], cfg["text_config"]
        layer = cfg.get("vision_feature_layer", -2)
        self.feature_layers = [layer] if isinstance(layer, int) else list(layer)
        n = vcfg["num_hidden_layers"]
        absolute = [i if i >= 0 else n + 1 + i for i in self.feature_layers]
        self.feature_layers = absolute
        self.num_vision_layers = max(absolute)
        self.select_strategy = cfg.get("vision_feature_select_strategy", "default")
        self.vision_tower = ClipVisionModel(vcfg, self.num_vision_layers)
        self.multi_modal_projector = LlavaProjector(vcfg["hidden_size"] * len(absolute), tcfg["hidden_size"],
                                                    cfg.get("projector_hidden_act", "gelu"),
                                                    bool(cfg.get("multimodal_projector_bias", True)))
        self.adopt_text_model(text_model_class(tcfg)(tcfg, backend))

    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's rows for the language model: [num_embeds, text hidden]."""
        pixels = item.inputs["pixel_values"].to(self.vision_tower.vision_model.embeddings.patch_embedding.weight.device)
        states = self.vision_tower(pixels)
        feats = [states[i] for i in self.feature_layers]
        if self.select_strategy == "default":
            feats = [f[:, 1:] for f in feats]   # drop CLS
        rows = self.multi_modal_projector(torch.cat(feats, dim=-1))
        return rows.reshape(-1, rows.shape[-1])

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        name = self.common_layout(name)
        if name.startswith("vision_tower."):
            inner = name[len("vision_tower."):]
            if not inner.startswith("vision_model."):   # transformers 5 saves the tower without it
                inner = "vision_model." + inner
            mapped = map_vision_name(inner, self.num_vision_layers)
            return None if mapped is None else "vision_tower." + mapped
        if name.startswith("language_model."):
            return self.map_text_name(name)
        return name
