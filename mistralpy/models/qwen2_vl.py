"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``):
a ViT (multimodal/encoders/qwen2_vl_vision.py) whose merged patch rows replace the expanded
``<|image_pad|>`` / ``<|video_pad|>`` embeddings, and a Qwen2 decoder with M-RoPE (layers/mrope.py).

Positions: the runner passes ``mrope_positions`` [3, T] (t, h, w) built from each request's prompt
table (``Request.mrope_positions``, computed once in Engine._prepare by the processor's
``positions``) and ``position + Request.mrope_delta`` on all three axes past the prompt; a
text-only request gets equal axes. Called without them (positions [T]) the model is plain RoPE.

Checkpoint names in both layouts (transformers' conversion_mapping for Qwen2VLForConditionalGeneration,
which Qwen2.5-VL shares): v5's ``model.visual.*`` / ``model.language_model.*`` / ``lm_head`` and
the published Qwen checkpoints' ``visual.*`` / ``model.*`` (the LM) / ``lm_head``.
"""
from __future__ import annotations

from typing import Any

import torch

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.mrope import get_mrope, mrope_section_from_config
from mistralpy.layers.rotary import rope_params_from_config
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.models.qwen2 import Qwen2ForCausalLM, Qwen2Model
from mistralpy.multimodal.encoders.qwen2_vl_vision import Qwen2_5_VisionTransformer, Qwen2VisionTransformer


class Qwen2VLTextModel(Qwen2Model):
    """Qwen2's decoder with one M-RoPE table shared by every layer (so a step's [3, T] lookup runs once)."""

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        attn = self.layers[0].self_attn
        base, scaling = rope_params_from_config(cfg)
        rope = get_mrope(attn.head_dim, int(cfg.get("max_position_embeddings", 32768)), base,
                         mrope_section_from_config(cfg), torch.float32, scaling, cfg.get("max_model_len"))
        for layer in self.layers:
            layer.self_attn.rotary_emb = rope


class Qwen2VLTextForCausalLM(Qwen2ForCausalLM):
    model_cls = Qwen2VLTextModel


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: transformers' head_dim (hidden / heads, whatever the config says)
    and the tie flag, which v5 keeps at the top level and older saves inside text_config."""
    tcfg = dict(cfg["text_config"])
    tcfg["head_dim"] = tcfg["hidden_size"] // tcfg["num_attention_heads"]
    tcfg["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings") or tcfg.get("tie_word_embeddings"))
    return tcfg


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    uses_mrope = True    # the runner builds ForwardBatch.mrope_positions for it
    isq_skip_prefixes = ("visual.",)
    vision_cls: type[Qwen2VisionTransformer] = Qwen2VisionTransformer
    ignored_suffixes = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.visual = self.vision_cls(cfg["vision_config"])
        self.language_model = Qwen2VLTextForCausalLM(text_config(cfg), backend)
        lm = self.language_model
        self.num_layers, self.num_kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.stacked_params = lm.stacked_params   # also splits the 2.5 tower's gate_proj / up_proj

    # ---- the contract of the model runner ------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, attn_metadata: Any,
                inputs_embeds: torch.Tensor | None = None,
                mrope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """positions [T] (the sequence index: plain RoPE) unless mrope_positions [3, T] is given."""
        model = self.language_model.model
        if inputs_embeds is None:
            inputs_embeds = model.embed_tokens(input_ids)
        rope_positions = mrope_positions if mrope_positions is not None else positions
        return model.decode_layers(rope_positions, inputs_embeds, kv_caches, attn_metadata)

    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's or video's rows for the language model: [num_embeds, text hidden]."""
        if item.modality == "video":
            pixels, grid = item.inputs["pixel_values_videos"], item.inputs["video_grid_thw"]
        else:
            pixels, grid = item.inputs["pixel_values"], item.inputs["image_grid_thw"]
        device = self.language_model.model.norm.weight.device
        return self.visual(pixels.to(device), torch.as_tensor(grid))

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        if name.startswith("model.visual."):
            return name[len("model."):]
        if name.startswith("visual."):
            return name
        if name.startswith("model.language_model."):        # transformers 5
            inner = "model." + name[len("model.language_model."):]
        elif name.startswith(("model.", "lm_head.")):   # the published Qwen checkpoints; a tied head is
            inner = name                                    # skipped by CausalLM.load_weights (Qwen2-VL-2B)
        else:
            return name
        mapped = self.language_model.map_weight_name(inner)
        return None if mapped is None else "language_model." + mapped


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    vision_cls = Qwen2_5_VisionTransformer
