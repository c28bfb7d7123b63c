"""The shared shell of every vision-language model: a text model held as ``language_model``, the
model runner's contract forwarded to it, and the weight-name rules common to transformers' layouts.

A family subclasses ``VisionLanguageModel``, builds its tower and projector, calls
``adopt_text_model`` and implements ``embed_multimodal(item) -> [item.num_embeds, hidden]`` (rows in
the order of ``item.placeholder.embed_positions()``). ``multimodal = True`` makes the loader pass the
whole config; ``isq_skip_prefixes`` keeps the tower float under ISQ.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.models.base import CausalLM


class VisionLanguageModel(CausalLM):
    multimodal = True
    lm_head_prefix = "language_model.lm_head."
    language_model: CausalLM

    def adopt_text_model(self, lm: CausalLM) -> None:
        """Hold ``lm`` and take its cache geometry and weight-fusing rules."""
        self.language_model = lm
        self.num_layers, self.num_kv_heads, self.head_dim = lm.num_layers, lm.num_kv_heads, lm.head_dim
        self.stacked_params = lm.stacked_params
        self.ignored_suffixes = lm.ignored_suffixes

    # ---- the contract of the model runner ------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list, attn_metadata: Any,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        lm = self.language_model
        if inputs_embeds is None:
            return lm(input_ids, positions, kv_caches, attn_metadata)
        return lm.model.decode_layers(positions, inputs_embeds, kv_caches, attn_metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.model.embed_tokens(input_ids)

    @property
    def model(self) -> nn.Module:
        """The text model's decoder stack, which the native CPU decode loop and --compile take over
        on decode-only steps (worker/native_decode.py, worker/compile.py look for ``model.model``).
        A property, not a submodule: parameter names stay ``language_model.model.*``."""
        return self.language_model.model

    @property
    def lm_head(self) -> nn.Module:
        return self.language_model.lm_head

    # ---- weights ---------------------------------------------------------------------------------
    @staticmethod
    def common_layout(name: str) -> str:
        """transformers 5's module names (``model.language_model.*``, ``model.<tower>``, ``lm_head``)
        -> the saved layout (``language_model.model.*``, ``<tower>``, ``language_model.lm_head``)."""
        if name.startswith("model."):
            name = name[len("model."):]
            if name.startswith("language_model."):
                name = "language_model.model." + name[len("language_model."):]
        if name.startswith("lm_head."):
            name = "language_model." + name
        return name

    def map_text_name(self, name: str) -> str | None:
        """``language_model.*`` through the text family's own mapping."""
        inner = self.language_model.map_weight_name(name[len("language_model."):])
        return None if inner is None else "language_model." + inner
