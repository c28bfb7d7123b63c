"""Mistral 3 (``Mistral3ForConditionalGeneration``): a Pixtral vision tower, Mistral 3's projector
(RMSNorm, 2x2 patch merger, linear-GELU-linear) and any of our text models. Image rows replace the
expanded ``[IMG]`` tokens' embeddings (multimodal/processors/pixtral.py expands; ``[IMG_BREAK]`` /
``[IMG_END]`` keep their own).

Checkpoint names: what transformers 5.24 writes (``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*``, ``language_model.lm_head.*``) and transformers 5's module names
(``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.*``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.errors import ModelLoadError
from mistralpy.layers.linear import Linear
from mistralpy.layers.norm import RMSNorm
from mistralpy.models.vlm import VisionLanguageModel
from mistralpy.models.llava import text_model_class
from mistralpy.multimodal.encoders.clip import VISION_ACTS
from mistralpy.multimodal.encoders.pixtral import PixtralVisionModel, map_pixtral_name


class Mistral3PatchMerger(nn.Module):
    """Each merge x merge window of the patch grid -> one row (transformers' unfold order:
    channel-major, then the window's row, column), through ``merging_layer``."""

    def __init__(self, hidden: int, merge: int) -> None:
        super().__init__()
        self.merge = merge
        self.merging_layer = Linear(hidden * merge ** 2, hidden, bias=False)

    def forward(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        d = x.shape[-1]
        grid = x.view(rows, cols, d).permute(2, 0, 1).unsqueeze(0)
        windows = F.unfold(grid, kernel_size=self.merge, stride=self.merge)   # [1, d * m^2, L]
        return self.merging_layer(windows.view(d * self.merge ** 2, -1).t().contiguous())


class Mistral3MultiModalProjector(nn.Module):
    def __init__(self, cfg: dict[str, Any], num_feature_layers: int) -> None:
        super().__init__()
        vh, th = cfg["vision_config"]["hidden_size"], cfg["text_config"]["hidden_size"]
        bias = bool(cfg.get("multimodal_projector_bias", False))
        self.norm = RMSNorm(vh * num_feature_layers, eps=cfg["text_config"].get("rms_norm_eps", 1e-6))
        self.patch_merger = Mistral3PatchMerger(vh * num_feature_layers, int(cfg.get("spatial_merge_size", 2)))
        self.linear_1 = Linear(vh * num_feature_layers, th, bias=bias)
        self.act = VISION_ACTS.get(cfg.get("projector_hidden_act", "gelu")) or F.gelu
        self.linear_2 = Linear(th, th, bias=bias)

    def forward(self, x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        x = self.patch_merger(self.norm(x), rows, cols)
        return self.linear_2(self.act(self.linear_1(x)))


class Mistral3ForConditionalGeneration(VisionLanguageModel):
    isq_skip_prefixes = ("vision_tower.", "multi_modal_projector.")

    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        super().__init__()
        vcfg, tcfg = cfg["vision_config"], cfg["text_config"]
        layer = cfg.get("vision_feature_layer", -1)
        layers = [layer] if isinstance(layer, int) else list(layer)
        n = vcfg["num_hidden_layers"]
        self.feature_layers = [i if i >= 0 else n + 1 + i for i in layers]   # hidden_states indices
        self.num_vision_layers = max(self.feature_layers)
        self.vision_tower = PixtralVisionModel(vcfg, self.num_vision_layers)
        self.multi_modal_projector = Mistral3MultiModalProjector(cfg, len(self.feature_layers))
        # the text model's q/k/v and gate/up fusions: the tower's projections share those names
        self.adopt_text_model(text_model_class(tcfg)(tcfg, backend))
        if not set(_TOWER_STACKED) <= set(self.stacked_params):
            raise ModelLoadError("Mistral 3: the language model must fuse q/k/v and gate/up as the tower does")

    # ---- the contract of the model runner ------------------------------------------------------
    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's rows for the language model: [num_embeds, text hidden], merged windows in
        row-major order (the order of the expansion's ``[IMG]`` tokens)."""
        tower = self.vision_tower
        pixels = item.inputs["pixel_values"].to(tower.patch_conv.weight.device)
        states = tower(pixels)
        rows, cols = pixels.shape[-2] // tower.patch_size, pixels.shape[-1] // tower.patch_size
        feats = torch.cat([states[i] for i in self.feature_layers], dim=-1)
        return self.multi_modal_projector(feats, rows, cols)

    # ---- weights ---------------------------------------------------------------------------------
    def map_weight_name(self, name: str) -> str | None:
        name = self.common_layout(name)
        if name.startswith("vision_tower."):
            inner = map_pixtral_name(name[len("vision_tower."):], self.num_vision_layers)
            return None if inner is None else "vision_tower." + inner
        if name.startswith("language_model."):
            return self.map_text_name(name)
        return name


# the tower's fusions (checkpoint shard -> our fused layer), which the text model's must include
_TOWER_STACKED = (("qkv_proj", "q_proj", 0), ("qkv_proj", "k_proj", 1), ("qkv_proj", "v_proj", 2),
                  ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))
