"""Qwen3-VL (``Qwen3VLForConditionalGeneration``): the Qwen3-VL ViT (multimodal/encoders/
qwen3_vl_vision.py) whose merged rows replace the expanded ``<|image_pad|>`` / ``<|video_pad|>``
embeddings, and a Qwen3 decoder (q/k norms) with interleaved M-RoPE (layers/mrope.py).

DeepStack: the tower also gives one row set per ``deepstack_visual_indexes`` entry, which
transformers adds to the hidden states after decoder layer i (i < their count) at the visual
positions. Without touching the runner: ``embed_multimodal`` returns [main | deepstack 0 | ...]
along the features, and ``embed_input_ids`` returns the text embeddings with zeros in those extra
columns, so the runner's scatter of encoder rows into ``inputs_embeds`` lands every part at the
image positions and leaves zeros elsewhere. ``forward`` splits the columns and adds part i after
layer i: adding zero leaves text rows bitwise unchanged, so no mask is needed, and a chunk that
cuts through an image run gets exactly its own rows.

Positions as Qwen2-VL (models/qwen2_vl.py): ``mrope_positions`` [3, T] from the runner, else plain.
Checkpoint names: ``model.visual.*`` / ``model.language_model.*`` / ``lm_head`` (also the
``visual.*`` / ``model.*`` layout, as Qwen2-VL's map_weight_name reads both).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.moe import split_fused_experts
from mistralpy.layers.mrope import get_mrope, mrope_section_from_config
from mistralpy.layers.rotary import rope_params_from_config
from mistralpy.models.base import CausalLM
from mistralpy.models.qwen2_vl import Qwen2VLForConditionalGeneration
from mistralpy.models.qwen3 import Qwen3ForCausalLM, Qwen3Model
from mistralpy.models.qwen3_moe import Qwen3MoeForCausalLM, Qwen3MoeModel
from mistralpy.multimodal.encoders.qwen3_vl_vision import Qwen3VisionTransformer


def install_interleaved_mrope(model: torch.nn.Module, cfg: dict[str, Any]) -> None:
    """One interleaved M-RoPE table shared by every layer (a step's [3, T] lookup runs once)."""
    attn = model.layers[0].self_attn
    base, scaling = rope_params_from_config(cfg)
    rope = get_mrope(attn.head_dim, int(cfg.get("max_position_embeddings", 128000)), base,
                     mrope_section_from_config(cfg), torch.float32, scaling, cfg.get("max_model_len"),
                     interleaved=True)
    for layer in model.layers:
        layer.self_attn.rotary_emb = rope


class Qwen3VLTextModel(Qwen3Model):
    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        install_interleaved_mrope(self, cfg)


class Qwen3VLTextForCausalLM(Qwen3ForCausalLM):
    model_cls = Qwen3VLTextModel


def text_config(cfg: dict[str, Any], moe: bool = False) -> dict[str, Any]:
    """The language model's config: transformers' head_dim (the config's, else its default: 128,
    MoE hidden / heads), its default mrope_section [24, 20, 20], the tie flag (transformers reads the
    top level; Qwen3-VL-MoE's text_config says true by default while the model is untied), and for
    MoE the router renormalisation transformers always applies."""
    tcfg = dict(cfg["text_config"])
    if not tcfg.get("head_dim"):
        tcfg["head_dim"] = tcfg["hidden_size"] // tcfg["num_attention_heads"] if moe else 128
    rope = dict(tcfg.get("rope_parameters") or tcfg.get("rope_scaling") or {})
    rope.setdefault("mrope_section", [24, 20, 20])
    tcfg["rope_parameters"] = rope
    tie = cfg["tie_word_embeddings"] if "tie_word_embeddings" in cfg else tcfg.get("tie_word_embeddings")
    tcfg["tie_word_embeddings"] = bool(tie)
    if moe:
        tcfg["norm_topk_prob"] = True
    return tcfg


class Qwen3VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    text_cls: type[CausalLM] = Qwen3VLTextForCausalLM
    moe = False

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        CausalLM.__init__(self)
        self.visual = Qwen3VisionTransformer(cfg["vision_config"])
        tcfg = text_config(cfg, self.moe)
        self.language_model = self.text_cls(tcfg, backend)
        lm = self.language_model
        self.num_layers, self.num_kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.stacked_params = lm.stacked_params
        self.hidden_size = int(tcfg["hidden_size"])
        self.num_deepstack = len(self.visual.deepstack_visual_indexes)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, attn_metadata: Any,
                inputs_embeds: torch.Tensor | None = None,
                mrope_positions: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds, when given, is [T, hidden * (1 + deepstack layers)] (embed_input_ids)."""
        model = self.language_model.model
        deepstack: list[torch.Tensor] = []
        if inputs_embeds is None:
            hidden = model.embed_tokens(input_ids)
        else:
            hidden, *deepstack = inputs_embeds.split(self.hidden_size, dim=-1)
        rope_positions = mrope_positions if mrope_positions is not None else positions
        for i, (layer, kv_cache) in enumerate(zip(model.layers, kv_caches)):
            hidden = layer(rope_positions, hidden, kv_cache, attn_metadata)
            if i < len(deepstack):   # zero outside the image rows
                hidden = hidden + deepstack[i]
        return model.norm(hidden)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings widened with zero DeepStack columns, the width of embed_multimodal's rows."""
        embeds = self.language_model.model.embed_tokens(input_ids)
        if not self.num_deepstack:
            return embeds
        return torch.cat([embeds, embeds.new_zeros(embeds.shape[0], self.hidden_size * self.num_deepstack)], -1)


# ---- Qwen3-VL-MoE ------------------------------------------------------------------------------------

class Qwen3VLMoeTextModel(Qwen3MoeModel):
    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__(cfg, backend)
        install_interleaved_mrope(self, cfg)


class Qwen3VLMoeTextForCausalLM(Qwen3MoeForCausalLM):
    model_cls = Qwen3VLMoeTextModel


class Qwen3VLMoeForConditionalGeneration(Qwen3VLForConditionalGeneration):
    """Qwen3-VL with Qwen3-MoE decoder layers (sparse unless in mlp_only_layers / off the
    decoder_sparse_step; softmax top-k always renormalised). Experts are stored fused:
    ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``, [E, 2I, H] / [E, H, I] as
    transformers holds them, or transposed ([E, H, 2I] / [E, I, H], the published checkpoints);
    as transformers' conversion (Transpose with check_dims), a tensor of the wrong shape is
    transposed, then split per expert (layers/moe.py)."""

    text_cls = Qwen3VLMoeTextForCausalLM
    moe = True

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._per_expert(weights))

    def _per_expert(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if not name.endswith((".experts.gate_up_proj", ".experts.down_proj")) or tensor.dim() != 3:
                yield name, tensor
                continue
            experts = self.get_submodule((self.map_weight_name(name) or name).rpartition(".")[0])
            num, hidden = experts.num_experts, experts.hidden_size
            inter = experts[0].down_proj.weight.shape[1]
            expected = (num, 2 * inter, hidden) if name.endswith("gate_up_proj") else (num, hidden, inter)
            if tuple(tensor.shape) != expected:
                tensor = tensor.transpose(1, 2)
            yield from split_fused_experts(name, tensor)
