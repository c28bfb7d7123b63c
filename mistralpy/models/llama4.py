"""Llama 4 (``Llama4ForConditionalGeneration``): the Llama 4 vision tower
(multimodal/encoders/llama4_vision.py), ``multi_modal_projector.linear_1`` and the Llama 4 text
model (models/llama4_text.py, also served alone as ``Llama4ForCausalLM``).

Each image arrives as tiles (the best-fit grid's, then the global one; multimodal/processors/
llama4.py); every tile gives (S / patch)^2 * ratio^2 rows, which replace the expansion's
``<|patch|>`` tokens in order (``image_token_index``); the markers (``<|image_start|>``, tile
separators, ``<|image|>``, ``<|image_end|>``) keep their own embeddings.

Checkpoint names: what transformers 5 writes (``vision_model.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``) and its module names
(``model.vision_model.*``, ``model.language_model.*``, ``lm_head.*``).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.layers.linear import Linear
from mistralpy.models.llama4_text import Llama4ForCausalLM
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.multimodal.encoders.llama4_vision import Llama4VisionModel


class Llama4MultiModalProjector(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.linear_1 = Linear(cfg["vision_config"]["vision_output_dim"], cfg["text_config"]["hidden_size"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_1(x)


class Llama4ForConditionalGeneration(VisionLanguageModel):
    isq_skip_prefixes = ("vision_model.", "multi_modal_projector.")

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        self.vision_model = Llama4VisionModel(cfg["vision_config"])
        self.multi_modal_projector = Llama4MultiModalProjector(cfg)
        self.adopt_text_model(Llama4ForCausalLM(cfg["text_config"], backend))

    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's rows: [tiles * rows per tile, text hidden], tile by tile (grid, then global)."""
        pixels = item.inputs["pixel_values"].to(self.vision_model.patch_embedding.linear.weight.device)
        feats = self.vision_model(pixels)
        b, n, d = feats.shape
        return self.multi_modal_projector(feats.reshape(b * n, d))

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        name = self.common_layout(name)
        if name.startswith("language_model."):
            return self.map_text_name(name)
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The text model's own preparation (expert split, q/k row order); the tower's q/k pass as they are.
        lm = self.language_model
        assert isinstance(lm, Llama4ForCausalLM)
        super().load_weights(lm.prepare_weights((self.common_layout(n), t) for n, t in weights))
