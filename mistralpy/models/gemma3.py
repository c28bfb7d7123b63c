"""Gemma 3 (text): Gemma 2's layer with RMSNorm on each head of q and k, local layers (sliding
window, rope base `rope_local_base_freq`) and global layers (rope base `rope_theta`, plus any rope
scaling), no attention soft-capping. `Gemma3ForConditionalGeneration` checkpoints load their
language model only (the vision tower and projector are skipped)."""
from __future__ import annotations

from typing import Any

import torch

from mistralpy.layers.rotary import RotaryEmbedding, get_rope, rope_params_from_config
from mistralpy.models.gemma2 import Gemma2Attention, Gemma2DecoderLayer, Gemma2ForCausalLM, Gemma2Model

# transformers' Gemma3TextConfig defaults, used when a config leaves them out.
DEFAULT_GLOBAL_THETA = 1_000_000.0
DEFAULT_LOCAL_THETA = 10_000.0
# The published multimodal configs (gemma-3-4b/12b/27b) give only what differs from these.
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
    rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
    rope_theta=DEFAULT_GLOBAL_THETA, rope_local_base_freq=DEFAULT_LOCAL_THETA)


def gemma3_rope_params(cfg: dict[str, Any], layer_type: str) -> tuple[float, dict | None]:
    """(rope_theta, scaling) of one layer type. transformers 5 writes `rope_parameters` nested by
    layer type; older configs give `rope_theta` + `rope_scaling` for global layers and
    `rope_local_base_freq` (never scaled) for local ones."""
    local = layer_type == "sliding_attention"
    default_theta = cfg.get("rope_local_base_freq", DEFAULT_LOCAL_THETA) if local else \
        cfg.get("rope_theta", DEFAULT_GLOBAL_THETA)
    raw = cfg.get("rope_parameters")
    if isinstance(raw, dict) and isinstance(raw.get(layer_type), dict):
        params = {"rope_theta": default_theta, **raw[layer_type]}
    elif local:
        params = {"rope_theta": default_theta}
    else:
        params = {**(cfg.get("rope_scaling") or {}), "rope_theta": default_theta}
    return rope_params_from_config({**cfg, "rope_scaling": None, "rope_parameters": params})


class Gemma3Attention(Gemma2Attention):
    use_attn_softcap = False  # transformers' Gemma 3 ignores attn_logit_softcapping
    qk_norm = True

    def make_rope(self, cfg: dict[str, Any], layer_type: str) -> RotaryEmbedding:
        base, scaling = gemma3_rope_params(cfg, layer_type)
        return get_rope(self.head_dim, self.head_dim, int(cfg.get("max_position_embeddings", 131072)), base, scaling,
                        torch.float32, max_model_len=cfg.get("max_model_len"))


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_cls = Gemma3Attention


class Gemma3Model(Gemma2Model):
    layer_cls = Gemma3DecoderLayer
    sliding_window_pattern = 6  # older configs without layer_types: every 6th layer global


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_cls = Gemma3Model

    @staticmethod
    def complete_config(hf_config: dict[str, Any]) -> dict[str, Any]:
        """config.json with the text model's missing keys at transformers' defaults (the engine
        reads sizes from it before the model exists)."""
        return {**TEXT_DEFAULTS, **hf_config}


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The language model of the multimodal checkpoint (its `text_config` is what the model gets)."""

    # transformers 5 saves `model.language_model.*`, older checkpoints `language_model.model.*`.
    _PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
    _VISION = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")

    @staticmethod
    def complete_config(hf_config: dict[str, Any]) -> dict[str, Any]:
        return {**hf_config, "text_config": {**TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}}

    def map_weight_name(self, name: str) -> str | None:
        if name.startswith(self._VISION):
            return None
        for old, new in self._PREFIXES:
            if name.startswith(old):
                return new + name[len(old):]
        return name
