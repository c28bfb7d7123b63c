"""Idefics2 (``Idefics2ForConditionalGeneration``, HuggingFaceM4/idefics2-8b): the NaViT-style SigLIP
tower Idefics3 also uses (multimodal/encoders/siglip.py), a connector (a SwiGLU modality projection
to the text width, then the perceiver resampler: multimodal/encoders/idefics2_perceiver.py) and a
Mistral text model (models/llama.py). Each frame of an image (the image, or its 4 quarters + the
image with ``do_image_splitting``: multimodal/processors/idefics2.py) gives ``resampler_n_latents``
rows, frame by frame, in the order of the item's ``<image>`` slots; the ``<fake_token_around_image>``
markers keep their own embeddings. Image tokens attend causally, as in transformers.

Two details differ from Idefics3: a patch is real only when all its pixels are (transformers'
``sum == patch^2``, where Idefics3 takes any pixel), and that patch mask also masks the perceiver's
context. transformers drops frames whose pixels are all exactly 0 (its batch padding); our items
hold no padding frames, so every frame is encoded.

Checkpoint names (transformers 4 and 5 save the same layout): ``model.vision_model.*``,
``model.connector.modality_projection.{gate,up,down}_proj.weight``,
``model.connector.perceiver_resampler.{latents, layers.N.*, norm.weight}``, ``model.text_model.*``,
``lm_head.weight``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.activation import act_and_mul, get_act_fn
from mistralpy.layers.linear import Linear, MergedLinear
from mistralpy.models.idefics3 import map_idefics_name, text_class_by_type
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.multimodal.encoders.idefics2_perceiver import PerceiverResampler, map_perceiver_name, perceiver_config
from mistralpy.multimodal.encoders.siglip import SiglipVisionTransformer, siglip_config

# transformers' Idefics2VisionConfig defaults (SigLIP's hidden_act / eps come from siglip_config).
VISION_DEFAULTS: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32}
# Idefics2Config's text defaults: MistralConfig's, with its own max positions / eps / pad id.
TEXT_DEFAULTS: dict[str, Any] = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
                                 "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                 "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 32768,
                                 "rms_norm_eps": 1e-5, "sliding_window": 4096, "pad_token_id": 0}
TOP_DEFAULTS: dict[str, Any] = {"image_token_id": 32001, "tie_word_embeddings": False}
_GATE_UP = (("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))


def full_patch_mask(pixel_mask: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, H, W] mask of real pixels -> [B, H / p, W / p]: a patch is real when every pixel is
    (transformers' Idefics2 unfold + sum == p^2; a partial edge patch is padding)."""
    b, h, w = pixel_mask.shape
    ph, pw = h // patch, w // patch
    return pixel_mask[:, :ph * patch, :pw * patch].bool().reshape(b, ph, patch, pw, patch).all(dim=4).all(dim=2)


class ModalityProjection(nn.Module):
    """SwiGLU from the vision width to the text width (intermediate: the text model's)."""

    def __init__(self, in_dim: int, inter: int, out_dim: int, act: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(in_dim, [inter, inter])   # checkpoint gate_proj / up_proj
        self.down_proj = Linear(inter, out_dim)
        self.act_fn = get_act_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act_fn))


class Idefics2Connector(nn.Module):
    def __init__(self, vision_hidden: int, tcfg: dict[str, Any], pcfg: dict[str, Any]) -> None:
        super().__init__()
        self.modality_projection = ModalityProjection(vision_hidden, tcfg["intermediate_size"], tcfg["hidden_size"],
                                                      tcfg.get("hidden_act", "silu"))
        self.perceiver_resampler = PerceiverResampler(pcfg)

    def forward(self, states: torch.Tensor, patch_mask: torch.Tensor | None) -> torch.Tensor:
        """[frames, patches, vision hidden] (+ [frames, patches] bool) -> [frames, n_latents, text hidden]."""
        return self.perceiver_resampler(self.modality_projection(states), patch_mask)


class Idefics2ForConditionalGeneration(VisionLanguageModel):
    isq_skip_prefixes = ("vision_model.", "connector.")

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        cfg = self.complete_config(cfg)
        vcfg, pcfg = cfg["vision_config"], cfg["perceiver_config"]
        # transformers ties the LM head by the top-level flag (PreTrainedModel reads config.tie_word_embeddings)
        tcfg = {**cfg["text_config"], "tie_word_embeddings": bool(cfg["tie_word_embeddings"])}
        self.vision_model = SiglipVisionTransformer(vcfg, variable_resolution=True)
        self.connector = Idefics2Connector(vcfg["hidden_size"], tcfg, pcfg)
        self.adopt_text_model(text_class_by_type(tcfg)(tcfg, backend))
        # the connector's SwiGLUs load gate_proj / up_proj as gate_up_proj's shards, whatever the text family fuses
        self.stacked_params = self.stacked_params + tuple(r for r in _GATE_UP if r not in self.stacked_params)

    @staticmethod
    def complete_config(hf_config: dict[str, Any]) -> dict[str, Any]:
        """Family defaults filled in (the engine and the processor read sizes before the model exists);
        idempotent. The text part keeps explicit nulls (``sliding_window: null`` is no window)."""
        cfg = {**TOP_DEFAULTS, **hf_config}
        vision = {k: v for k, v in (cfg.get("vision_config") or {}).items() if k != "model_type"}
        text = {**TEXT_DEFAULTS, **(cfg.get("text_config") or {})}
        perceiver = perceiver_config(cfg.get("perceiver_config") or {}, text)
        return {**cfg, "vision_config": siglip_config(vision, VISION_DEFAULTS), "text_config": text,
                "perceiver_config": perceiver}

    # ---- the contract of the model runner ------------------------------------------------------
    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's rows for the language model: [frames * n_latents, text hidden], frame by frame."""
        dev = self.vision_model.embeddings.patch_embedding.weight.device
        pixels = item.inputs["pixel_values"].to(dev)
        pixel_mask = item.inputs.get("pixel_attention_mask")
        patch_mask = None
        if pixel_mask is not None:
            patch_mask = full_patch_mask(pixel_mask.to(dev), self.vision_model.patch_size)
        states = self.vision_model(pixels, patch_mask)
        flat = None if patch_mask is None else patch_mask.reshape(patch_mask.shape[0], -1)
        rows = self.connector(states, flat)
        return rows.reshape(-1, rows.shape[-1])

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        name = name.removeprefix("model.")
        if name.startswith("connector.perceiver_resampler."):
            return map_perceiver_name(name)
        return map_idefics_name(self.language_model, name)   # tower, text model, head, projection
