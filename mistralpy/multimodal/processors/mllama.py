"""Mllama (Llama 3.2 Vision): tiled images and the cross-attention visibility rule.

Pixels follow transformers' ``MllamaImageProcessorPil``: pick the tile arrangement (rows x cols,
rows * cols <= ``max_image_tiles``) whose canvas needs the smallest upscale (else the mildest
downscale; ties: the smallest canvas), resize the image to fit that canvas keeping its aspect
(no side below one tile unless the canvas is smaller), pad bottom / right with black, rescale,
normalise and cut the canvas into tiles, row by row. ``aspect_ratio_id`` is the arrangement's index
among all arrangements (by rows, then cols) + 1.

The ``<|image|>`` token stays one token (no expansion): it is the item's placeholder. What it changes
is which text rows see the image in the cross-attention layers (transformers' MllamaProcessor rule):
image i is seen from its token up to the next image token; the last image (and a run of adjacent
image tokens ending the prompt's images) until the end of the sequence, generated tokens included.
``item.extra["cross_span"] = (start, end or None)`` carries that; the model runner hands it to the
model (worker/model_runner.py, ``CrossMedia``). Unlike transformers' MllamaProcessor we do not insert
a BOS after leading image tokens of a prompt without one: the ids are the tokenizer's / template's.
"""
from __future__ import annotations

import math
from functools import lru_cache
from itertools import pairwise
from typing import Any

import numpy as np
import torch
from PIL import Image

from mistralpy.multimodal.inputs import MMItem, PlaceholderRange, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor
from mistralpy.multimodal.processors.llava import config_image_token_id


@lru_cache(maxsize=16)
def tile_arrangements(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (a, b) with a * b <= max_tiles, a outer: transformers' get_all_supported_aspect_ratios."""
    return tuple((a, b) for a in range(1, max_tiles + 1) for b in range(1, max_tiles + 1) if a * b <= max_tiles)


def best_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(canvas height, canvas width) in pixels for an image of height x width."""
    canvases = [(a * tile, b * tile) for a, b in tile_arrangements(max_tiles)]
    scales = [min(ch / height, cw / width) for ch, cw in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    ties = [c for c, s in zip(canvases, scales) if s == chosen]
    return min(ties, key=lambda c: c[0] * c[1])   # min keeps the first of equal areas, as argmin


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The resized (height, width): each side clipped to [tile, canvas side], then the tighter scale wins."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def cross_spans(token_ids: list[int], image_token_id: int) -> list[tuple[int, int | None]]:
    """(first, end) positions that see each image, in prompt order; end None: the rest of the sequence."""
    locs = [i for i, t in enumerate(token_ids) if t == image_token_id]
    spans: list[list[Any]] = [[a, b] for a, b in pairwise(locs)] + ([[locs[-1], None]] if locs else [])
    nxt_end: int | None = None
    for span in reversed(spans):   # adjacent image tokens form a group: all are seen as far as the last one
        if span[1] is not None and span[0] == span[1] - 1:
            span[1] = nxt_end
        nxt_end = span[1]
    return [(a, b) for a, b in spans]


@register_processor("MllamaForConditionalGeneration")
class MllamaProcessor(MultimodalProcessor):
    image_placeholder = "<|image|>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        pp, vc = self.pp, hf_config.get("vision_config") or {}
        size = pp.get("size") or {"height": vc.get("image_size", 560), "width": vc.get("image_size", 560)}
        self.tile = int(size["height"]) if isinstance(size, dict) else int(size)
        self.max_tiles = int(pp.get("max_image_tiles", vc.get("max_num_tiles", 4)))
        self.resample = int(pp.get("resample", 2))
        self.rescale_factor = float(pp.get("rescale_factor", 1 / 255))
        self.mean = tuple(pp.get("image_mean", image_ops.IMAGENET_STANDARD_MEAN))
        self.std = tuple(pp.get("image_std", image_ops.IMAGENET_STANDARD_STD))
        self.do_rescale, self.do_normalize = pp.get("do_rescale", True), pp.get("do_normalize", True)
        patch = int(vc.get("patch_size", 14))
        self.rows_per_tile = (self.tile // patch) ** 2 + 1   # patches + the class row
        self.image_token_id = config_image_token_id(hf_config, tokenizer, self.image_placeholder)

    def _settings(self) -> tuple:
        return ("mllama", self.tile, self.max_tiles, self.resample, self.rescale_factor, self.mean, self.std,
                self.do_rescale, self.do_normalize)

    def tiles(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        """float32 [rows * cols, 3, tile, tile] and the arrangement (rows, cols)."""
        x = image_ops.to_rgb_array(image)
        h, w = x.shape[1:]
        canvas_h, canvas_w = best_canvas(h, w, self.max_tiles, self.tile)
        new_h, new_w = fit_to_canvas(h, w, canvas_h, canvas_w, self.tile)
        x = image_ops.resize(x, new_h, new_w, self.resample)
        padded = np.zeros((x.shape[0], canvas_h, canvas_w), dtype=x.dtype)
        padded[:, :new_h, :new_w] = x
        y = image_ops.rescale(padded, self.rescale_factor) if self.do_rescale else padded.astype(np.float32)
        if self.do_normalize:
            y = image_ops.normalize(y, self.mean, self.std)
        rows, cols = canvas_h // self.tile, canvas_w // self.tile
        t = self.tile
        y = y.reshape(3, rows, t, cols, t).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        return np.ascontiguousarray(y), (rows, cols)

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        tiles, arrangement = self.tiles(image)
        n = tiles.shape[0]
        inputs = {"pixel_values": torch.from_numpy(tiles),   # real tiles only; the tower pads to max_tiles
                  "aspect_ratio_id": tile_arrangements(self.max_tiles).index(arrangement) + 1, "num_tiles": n}
        # the encoder yields rows_per_tile rows for each real tile (what cross-attention attends to)
        return MMItem("image", content_hash(image_hash, self._settings()), inputs, n * self.rows_per_tile,
                      extra={"arrangement": arrangement})

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        """No expansion: each ``<|image|>`` is its item's one-token placeholder; sets the cross spans."""
        spans = cross_spans(token_ids, self.image_token_id)
        if len(spans) != len(items):
            raise self.placeholder_count_error(len(spans), len(items))
        for item, (start, end) in zip(items, spans):
            item.placeholder = PlaceholderRange(start, 1)
            item.extra["cross_span"] = (start, end)
        return list(token_ids)
