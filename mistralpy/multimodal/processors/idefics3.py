"""Idefics3 / SmolVLM preprocessing (the token-id splicing is processors/splice.py).

Pixels follow transformers' ``Idefics3ImageProcessorPil`` (SmolVLM's is the same code): resize the
longest edge to ``size.longest_edge`` (even short side), round both sides up to multiples of
``max_image_size.longest_edge``, cut that grid into square tiles and append the whole image resized
to one tile (the "global" image); small images are one tile and no grid.

Text follows ``Idefics3Processor.replace_image_token``: per tile ``<fake_token_around_image>
<row_r_col_c>`` + ``<image>`` x image_seq_len, "\\n" after each grid row, then "\\n<fake_token_around_
image><global-img>" + ``<image>`` x image_seq_len + ``<fake_token_around_image>``.
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

MAX_IMAGE_SIZE = 4096   # transformers' absolute cap on an Idefics3 image side


# ---------------------------------------------------------------------------------- shared pixels
def pad_tiles(tiles: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [C, h, w] tiles -> ([n, C, H, W] zero-padded at the bottom / right, [n, H, W] bool mask
    of real pixels), H, W the largest tile sides (transformers' Idefics pad for one image)."""
    h = max(t.shape[1] for t in tiles)
    w = max(t.shape[2] for t in tiles)
    pixels = np.zeros((len(tiles), tiles[0].shape[0], h, w), dtype=np.float32)
    mask = np.zeros((len(tiles), h, w), dtype=bool)
    for n, t in enumerate(tiles):
        pixels[n, :, :t.shape[1], :t.shape[2]] = t
        mask[n, :t.shape[1], :t.shape[2]] = True
    return torch.from_numpy(pixels), torch.from_numpy(mask)


def _edge(value: Any, default: int) -> int:
    """``{"longest_edge": n}`` or a bare int from a preprocessor config."""
    if isinstance(value, dict):
        value = value.get("longest_edge")
    return int(value) if isinstance(value, (int, float)) and value else default


# ----------------------------------------------------------------------------------- Idefics3 pixels
def _rescale_to_max_len(height: int, width: int, max_len: int) -> tuple[int, int]:
    """Longest side -> max_len, the other by the aspect ratio, rounded up to even, at least 1."""
    aspect = width / height
    if width >= height:
        width = max_len
        height = int(width / aspect)
        height += height % 2
    else:
        height = max_len
        width = int(height * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def _scale_below(height: int, width: int, max_len: int) -> tuple[int, int]:
    aspect = width / height
    if width >= height and width > max_len:
        width = max_len
        height = int(width / aspect)
    elif height > width and height > max_len:
        height = max_len
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def _multiples_of(height: int, width: int, tile: int) -> tuple[int, int]:
    """transformers' resize_for_vision_encoder size: both sides rounded up to multiples of ``tile``."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def idefics3_tiles(image: Image.Image, pp: dict[str, Any]) -> tuple[list[np.ndarray], int, int]:
    """Float32 [3, t, t] tiles (grid row-major, then the global image) and the grid's rows, cols
    (0, 0 when the image is one tile), as Idefics3ImageProcessorPil makes them."""
    resample = pp.get("resample", 1)   # LANCZOS
    tile = _edge(pp.get("max_image_size"), 364)
    img = image_ops.to_rgb_array(image)
    if pp.get("do_resize", True):
        size = pp.get("size") or {}
        if isinstance(size, dict) and not size.get("longest_edge") and size.get("height") and size.get("width"):
            h, w = int(size["height"]), int(size["width"])
        else:
            h, w = _rescale_to_max_len(img.shape[1], img.shape[2], _edge(size, 4 * 364))
            h, w = _scale_below(h, w, MAX_IMAGE_SIZE)
        img = image_ops.resize(img, h, w, resample)
    rows = cols = 0
    if pp.get("do_image_splitting", True):
        h, w = _multiples_of(img.shape[1], img.shape[2], tile)
        img = image_ops.resize(img, h, w, resample)
        if h > tile or w > tile:
            rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
            frames = [img[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
                      for r in range(rows) for c in range(cols)]
            frames.append(image_ops.resize(img, tile, tile, resample))
        else:
            frames = [img]
    else:
        frames = [image_ops.resize(img, tile, tile, resample)]
    return [rescale_normalize(f, pp) for f in frames], rows, cols


def _image_seq_len(processor_config: dict[str, Any], hf_config: dict[str, Any], default: int) -> int:
    """<image> tokens per tile: processor_config's image_seq_len, else (image_size / patch)^2 / scale^2."""
    n = processor_config.get("image_seq_len")
    if isinstance(n, int) and n > 0:
        return n
    vision = hf_config.get("vision_config") or {}
    size, patch, scale = vision.get("image_size"), vision.get("patch_size"), hf_config.get("scale_factor")
    if size and patch and scale:
        return int(((size // patch) ** 2) / (scale ** 2))
    return default


@register_processor("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
class Idefics3Processor(MultimodalProcessor):
    """Idefics3 and SmolVLM images: tiles + a global image, expanded with row / column markers."""

    image_placeholder = "<image>"
    fake_token = "<fake_token_around_image>"
    global_token = "<global-img>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        self.image_seq_len = _image_seq_len(self.processor_config, hf_config, 169)
        self.splicer = TokenSplicer(tokenizer)
        self.image_id = self.splicer.required_id(self.image_placeholder, hf_config.get("image_token_id"))
        self.fake = self.splicer.marker(self.fake_token)
        self.global_img = self.splicer.marker(self.global_token)
        pp = self.pp
        self._settings = ("idefics3", pp.get("do_resize", True), repr(pp.get("size")),
                          _edge(pp.get("max_image_size"), 364), pp.get("do_image_splitting", True),
                          pp.get("resample", 1), pp.get("do_rescale", True), pp.get("rescale_factor", 1 / 255),
                          pp.get("do_normalize", True), repr(pp.get("image_mean")), repr(pp.get("image_std")))

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        self.splicer.check_usable()
        tiles, rows, cols = idefics3_tiles(image, self.pp)
        pixels, mask = pad_tiles(tiles)
        return MMItem("image", content_hash(image_hash, *self._settings),
                      {"pixel_values": pixels, "pixel_attention_mask": mask},
                      num_embeds=len(tiles) * self.image_seq_len, extra={"rows": rows, "cols": cols})

    def expansion(self, rows: int, cols: int) -> list[Piece]:
        """The pieces of Idefics3Processor.replace_image_token for a rows x cols grid."""
        images: list[Piece] = [self.image_id] * self.image_seq_len
        pieces: list[Piece] = []
        for r in range(rows):
            for c in range(cols):
                pieces += [self.fake, self.splicer.marker(f"<row_{r + 1}_col_{c + 1}>"), *images]
            pieces.append("\n")
        if rows or cols:
            pieces.append("\n")
        return [*pieces, self.fake, self.global_img, *images, self.fake]

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        expansions = [self.expansion(it.extra["rows"], it.extra["cols"]) for it in items]
        return expand_with(self, self.splicer, token_ids, items, self.image_id, self.image_id, expansions)


__all__ = ["Idefics3Processor", "idefics3_tiles", "pad_tiles"]
