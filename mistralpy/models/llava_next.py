"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): LLaVA 1.5's CLIP tower, projector and text
model, with "anyres" images. Each image arrives as [1 + crops, 3, S, S] (the whole image resized,
then the grid crops; multimodal/processors/llava_next.py); its rows are the base crop's features,
then the grid's features laid out as one [rows, cols] map with the padding cut off and
``image_newline`` after each row (transformers' pack_image_features, "spatial_unpad").

Checkpoint names: LLaVA's three layouts (models/llava.py) plus ``image_newline`` at the top level
(llava-hf, what transformers 5.24 writes) or as ``model.image_newline`` (transformers 5's modules).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mistralpy.attention.backend import AttentionBackend
from mistralpy.errors import ModelLoadError
from mistralpy.models.llava import LlavaForConditionalGeneration
from mistralpy.multimodal.processors.llava_next import DEFAULT_PINPOINTS, anyres_grid, unpadded_grid


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, cfg: dict[str, Any], backend: AttentionBackend) -> None:
        vcfg = cfg["vision_config"]
        if vcfg.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ModelLoadError(f"LLaVA-NeXT with a {vcfg.get('model_type')!r} vision tower is not supported (CLIP only)")
        if cfg.get("vision_feature_select_strategy", "default") != "default":
            # CLIP has a CLS row per crop: with "full" the grid features do not tile (transformers fails too)
            raise ModelLoadError("LLaVA-NeXT with a CLIP tower needs vision_feature_select_strategy 'default'")
        super().__init__(cfg, backend)
        self.image_size = int(vcfg["image_size"])
        self.side = self.image_size // int(vcfg["patch_size"])   # features per crop edge
        self.pinpoints = [list(map(int, p)) for p in (cfg.get("image_grid_pinpoints") or DEFAULT_PINPOINTS)]
        self.image_newline = nn.Parameter(torch.empty(cfg["text_config"]["hidden_size"]))

    @torch.inference_mode()
    def embed_multimodal(self, item: Any) -> torch.Tensor:
        """One image's rows for the language model: [num_embeds, text hidden]."""
        dev = self.vision_tower.vision_model.embeddings.patch_embedding.weight.device
        pixels = item.inputs["pixel_values"].to(dev)
        orig_h, orig_w = (int(v) for v in item.inputs["image_sizes"].reshape(-1).tolist())
        states = self.vision_tower(pixels)
        feats = torch.cat([states[i][:, 1:] for i in self.feature_layers], dim=-1)   # drop CLS
        rows = self.multi_modal_projector(feats)                                     # [1 + crops, side^2, D]
        base, grid = rows[0], rows[1:]
        n_rows, n_cols = anyres_grid(orig_h, orig_w, self.pinpoints, self.image_size)
        if grid.shape[0] != n_rows * n_cols:
            raise ValueError(f"LLaVA-NeXT: {grid.shape[0]} crops for a {n_rows}x{n_cols} grid")
        s, d = self.side, rows.shape[-1]
        # crops in row-major order -> one feature map [rows * s, cols * s, D]
        fmap = grid.view(n_rows, n_cols, s, s, d).permute(0, 2, 1, 3, 4).reshape(n_rows * s, n_cols * s, d)
        top, bottom, left, right = unpadded_grid(orig_h, orig_w, n_rows * s, n_cols * s)
        fmap = fmap[top:bottom, left:right]
        newline = self.image_newline.to(fmap.dtype).expand(fmap.shape[0], 1, d)
        fmap = torch.cat([fmap, newline], dim=1)
        return torch.cat([base, fmap.reshape(-1, d)])

    def map_weight_name(self, name: str) -> str | None:
        if name in ("image_newline", "model.image_newline"):
            return "image_newline"
        return super().map_weight_name(name)
