"""Pixtral / Mistral 3 preprocessing and the ``[IMG]`` expansion (transformers' PixtralImageProcessorPil
and PixtralProcessor, which Mistral3ForConditionalGeneration checkpoints name).

Pixels: shrink (never enlarge) to fit ``size.longest_edge`` keeping the aspect ratio (floored sides),
then resize up to the next multiples of the effective patch (``patch_size * spatial_merge_size``: the
processor overrides the image processor's own ``patch_size`` with it); no crop, no padding for one image.

Text: each ``[IMG]`` becomes rows of ``[IMG]`` x (width / effective patch), each row ended by
``[IMG_BREAK]`` and the last one by ``[IMG_END]``. Only the ``[IMG]`` positions take the encoder's rows
(the break / end tokens keep their own embeddings, as Mistral3Model's ``image_token_id`` mask does).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from mistralpy.multimodal.inputs import MMItem, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor
from mistralpy.multimodal.processors.image_ops import rescale_normalize
from mistralpy.multimodal.processors.splice import Piece, TokenSplicer, expand_with


def _pair(value: Any, default: int) -> tuple[int, int]:
    """An int, a {"height", "width"} / {"longest_edge"} dict or a pair -> (height, width)."""
    if value is None:
        return default, default
    if isinstance(value, dict):
        if "longest_edge" in value:
            return int(value["longest_edge"]), int(value["longest_edge"])
        return int(value["height"]), int(value["width"])
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def pixtral_size(height: int, width: int, max_hw: tuple[int, int], patch_hw: tuple[int, int]) -> tuple[int, int]:
    """transformers' pixtral get_resize_output_image_size: (height, width) after resizing."""
    ratio = max(height / max_hw[0], width / max_hw[1])
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    ph, pw = patch_hw
    return ((height - 1) // ph + 1) * ph, ((width - 1) // pw + 1) * pw


@register_processor("Mistral3ForConditionalGeneration")
class PixtralProcessor(MultimodalProcessor):
    image_placeholder = "[IMG]"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        pc, vc = self.processor_config, hf_config.get("vision_config") or {}
        patch = int(pc.get("patch_size") or vc.get("patch_size", 16))
        merge = int(pc.get("spatial_merge_size") or hf_config.get("spatial_merge_size", 1))
        self.patch = patch * merge      # PixtralProcessor._process_images' patch_size
        pp = self.pp
        self.max_hw = _pair(pp.get("size"), 1024)
        self.do_resize = pp.get("do_resize", True)
        self.resample = int(pp.get("resample", 3))
        self.norm_pp = {"do_rescale": pp.get("do_rescale", True), "rescale_factor": pp.get("rescale_factor", 1 / 255),
                        "do_normalize": pp.get("do_normalize", True),
                        "image_mean": pp.get("image_mean") or image_ops.OPENAI_CLIP_MEAN,
                        "image_std": pp.get("image_std") or image_ops.OPENAI_CLIP_STD}
        self.splicer = TokenSplicer(tokenizer)
        cfg_id = hf_config.get("image_token_id", hf_config.get("image_token_index"))
        self.image_id = self.splicer.required_id(pc.get("image_token", "[IMG]"), cfg_id)
        self.break_id = self.splicer.required_id(pc.get("image_break_token", "[IMG_BREAK]"))
        self.end_id = self.splicer.required_id(pc.get("image_end_token", "[IMG_END]"))
        self._settings = ("pixtral", self.patch, self.max_hw, self.do_resize, self.resample,
                          repr(sorted(self.norm_pp.items())))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """float32 [3, H, W] as PixtralImageProcessorPil computes them for one image."""
        x = image_ops.to_rgb_array(image)
        if self.do_resize:
            h, w = pixtral_size(x.shape[1], x.shape[2], self.max_hw, (self.patch, self.patch))
            x = image_ops.resize(x, h, w, self.resample)
        return rescale_normalize(x, self.norm_pp)

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        self.splicer.check_usable()
        px = torch.from_numpy(np.ascontiguousarray(self.pixels(image)))[None]
        rows, cols = px.shape[-2] // self.patch, px.shape[-1] // self.patch
        return MMItem("image", content_hash(image_hash, *self._settings), {"pixel_values": px},
                      rows * cols, extra={"rows": rows, "cols": cols})

    def expansion(self, rows: int, cols: int) -> list[Piece]:
        out: list[Piece] = []
        for _ in range(rows):
            out += [self.image_id] * cols + [self.break_id]
        out[-1] = self.end_id
        return out

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        expansions = [self.expansion(it.extra["rows"], it.extra["cols"]) for it in items]
        return expand_with(self, self.splicer, token_ids, items, self.image_id, self.image_id, expansions)


__all__ = ["PixtralProcessor", "pixtral_size"]
