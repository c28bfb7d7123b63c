"""LLaVA-NeXT ("anyres"): the image resized and zero-padded to the best of the grid pinpoints, cut
into crops of the tower's size, plus the whole image resized to one crop (transformers'
LlavaNextImageProcessorPil); one ``<image>`` expanded to the base crop's features, the unpadded
grid features and one newline row-end per grid row (LlavaNextProcessor._get_number_of_features).

The arithmetic helpers here are shared with the model (models/llava_next.py), so the expansion
count and the rows the model packs cannot drift apart.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from mistralpy.multimodal.inputs import MMItem, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor
from mistralpy.multimodal.processors.llava import config_image_token_id, expand_repeated, read_clip_settings

DEFAULT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def select_best_resolution(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The (h, w) pinpoint keeping the most of the image's resolution, then wasting the least
    (transformers' select_best_resolution, same float arithmetic)."""
    best, max_effective, min_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        down_w, down_h = int(width * scale), int(height * scale)
        effective = min(down_w * down_h, width * height)
        wasted = pw * ph - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            best, max_effective, min_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise ValueError("image_grid_pinpoints is empty")
    return best


def patch_output_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The size the image is resized to inside the target before padding (aspect kept, ceil)."""
    th, tw = target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), th), tw
    return th, min(math.ceil(width * scale_h), tw)


def unpadded_grid(orig_h: int, orig_w: int, cur_h: int, cur_w: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) feature rows / columns kept of a [cur_h, cur_w] feature grid once
    the padding added around an orig_h x orig_w image is cut off (transformers' unpad_image)."""
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def anyres_grid(orig_h: int, orig_w: int, pinpoints: Sequence[Sequence[int]], crop: int) -> tuple[int, int]:
    """(crop rows, crop columns) of the grid an orig_h x orig_w image is cut into."""
    bh, bw = select_best_resolution(orig_h, orig_w, pinpoints)
    return bh // crop, bw // crop


def num_image_features(orig_h: int, orig_w: int, pinpoints: Sequence[Sequence[int]], crop: int, patch: int,
                       extra: int = 0) -> int:
    """Rows one image yields: the base crop's (side/patch)^2 (+ ``extra``, e.g. a kept CLS), the
    unpadded grid's features and one newline per grid feature row."""
    rows, cols = anyres_grid(orig_h, orig_w, pinpoints, crop)
    side = crop // patch
    top, bottom, left, right = unpadded_grid(orig_h, orig_w, rows * side, cols * side)
    h, w = bottom - top, right - left
    return side * side + extra + h * w + h


@register_processor("LlavaNextForConditionalGeneration")
class LlavaNextProcessor(MultimodalProcessor):
    image_placeholder = "<image>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        pp, vc = self.pp, hf_config.get("vision_config") or {}
        image_size = int(vc.get("image_size", 336))
        size = pp.get("size") or {"shortest_edge": image_size}
        self.size = {"shortest_edge": int(size)} if isinstance(size, int) else {k: int(v) for k, v in size.items()}
        crop = pp.get("crop_size") or {"height": image_size, "width": image_size}
        self.crop = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        # the base image is resized to `size` as a square (h, w) and the grid is cut in crop-height squares
        self.base_hw = ((self.size["height"], self.size["width"]) if "height" in self.size
                        else (self.size["shortest_edge"],) * 2)
        self.crop_side = self.crop[0]
        self.pinpoints = [list(map(int, p)) for p in (pp.get("image_grid_pinpoints")
                                                       or hf_config.get("image_grid_pinpoints") or DEFAULT_PINPOINTS)]
        read_clip_settings(self, pp, vc)
        # CLIP has a CLS position: "default" drops it, "full" keeps it (the processor's
        # num_additional_image_tokens=1 and the -1 for "default" cancel out)
        self.extra = 0 if hf_config.get("vision_feature_select_strategy", "default") == "default" else 1
        self.image_token_id = config_image_token_id(hf_config, tokenizer, self.image_placeholder)

    def _settings(self) -> tuple:
        return ("llava_next", tuple(sorted(self.size.items())), self.crop, tuple(map(tuple, self.pinpoints)),
                self.do_resize, self.do_center_crop, self.resample, self.rescale_factor, self.mean, self.std)

    def _finish(self, x: np.ndarray) -> np.ndarray:
        """One uint8 crop -> float32, through the per-patch steps (resize / crop are no-ops at crop size)."""
        if self.do_resize:
            if "shortest_edge" in self.size:
                h, w = image_ops.shortest_edge_size(x.shape[1], x.shape[2], self.size["shortest_edge"])
            else:
                h, w = self.size["height"], self.size["width"]
            x = image_ops.resize(x, h, w, self.resample)
        if self.do_center_crop:
            x = image_ops.center_crop(x, *self.crop)
        return image_ops.normalize(image_ops.rescale(x, self.rescale_factor), self.mean, self.std)

    def pixels(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """(float32 [1 + crops, 3, H, W], (orig h, orig w)) as LlavaNextImageProcessorPil computes them."""
        x = image_ops.to_rgb_array(image)
        h, w = x.shape[1:]
        target = select_best_resolution(h, w, self.pinpoints)
        nh, nw = patch_output_size(h, w, target)
        grid = image_ops.resize(x, nh, nw, self.resample)
        (top, left), (dh, dw) = ((target[0] - nh) // 2, (target[1] - nw) // 2), (target[0] - nh, target[1] - nw)
        grid = np.pad(grid, ((0, 0), (top, dh - top), (left, dw - left)))   # zeros, centred (odd pixel last)
        s = self.crop_side
        crops = [grid[:, i:i + s, j:j + s] for i in range(0, target[0], s) for j in range(0, target[1], s)]
        base = image_ops.resize(x, *self.base_hw, self.resample)
        return np.stack([self._finish(c) for c in [base] + crops]), (int(h), int(w))

    def num_image_tokens(self, height: int, width: int) -> int:
        return num_image_features(height, width, self.pinpoints, self.crop_side, self.patch, self.extra)

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        px, (h, w) = self.pixels(image)
        n = self.num_image_tokens(h, w)
        inputs = {"pixel_values": torch.from_numpy(np.ascontiguousarray(px)),
                  "image_sizes": torch.tensor([h, w], dtype=torch.long)}
        return MMItem("image", content_hash(image_hash, self._settings()), inputs, n)

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        return expand_repeated(self, token_ids, items, self.image_token_id)
