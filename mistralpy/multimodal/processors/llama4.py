"""Llama 4 preprocessing and the ``<|image|>`` expansion (transformers' Llama4ImageProcessor, a
torchvision processor, and Llama4Processor).

Pixels: among the canvases of up to ``max_patches`` square tiles (``size``), pick the best fit (the
smallest upscale >= 1, else the mildest downscale; ties -> the smallest area), resize the uint8
image without distortion into it (upscaling at most to one tile side, unless
``resize_to_max_canvas``; antialiased bilinear, as torchvision on uint8), zero-pad right / bottom,
rescale and normalise *in bfloat16* (as the original implementation and transformers do), cut the
canvas into tiles row by row and, when there are several, add the whole image resized to one tile
(the global tile). Values are returned as float32 (exactly the bfloat16 values).

Text: ``<|image_start|>``, then for a grid: per tile ``<|patch|>`` x n, ``<|tile_x_separator|>``
between a row's tiles, ``<|tile_y_separator|>`` after each row; then ``<|image|>``, ``<|patch|>`` x n
(the global tile, or the only one), ``<|image_end|>``; n = (S / patch)^2 * pixel_shuffle_ratio^2.
Only ``<|patch|>`` positions take the tower's rows.
"""
from __future__ import annotations

import math
import platform
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mistralpy.multimodal.inputs import MediaError, MMItem, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor
from mistralpy.multimodal.processors.splice import Piece, TokenSplicer, expand_with


def supported_resolutions(max_chunks: int, tile: int) -> list[tuple[int, int]]:
    """Canvases (h, w) of 1..max_chunks tiles, in transformers' order (grouped by aspect ratio in
    the order ratios first appear, counting chunks down from max_chunks)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for chunks in range(max_chunks, 0, -1):
        factors = sorted({f for i in range(1, int(chunks ** 0.5) + 1) if chunks % i == 0 for f in (i, chunks // i)})
        for h in factors:
            by_ratio.setdefault(h / (chunks // h), []).append((h, chunks // h))
    return [(h * tile, w * tile) for group in by_ratio.values() for h, w in group]


def best_fit(height: int, width: int, canvases: list[tuple[int, int]], to_max_canvas: bool) -> tuple[int, int]:
    """transformers' get_best_fit (float32 scales, as its tensors compute them)."""
    res = torch.tensor(canvases)
    scale_h = res[:, 0] / height
    scale_w = res[:, 1] / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    if len(up) > 0:
        chosen = up.max() if to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    cands = res[scales == chosen]
    best = cands[torch.argmin(cands[:, 0] * cands[:, 1])] if len(cands) > 1 else cands[0]
    return int(best[0]), int(best[1])


def fit_without_distortion(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """The largest (h, w) of the image's aspect ratio inside the target (floored), at least 1."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


def resize_uint8(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [C, H, W] -> [C, height, width], antialiased bilinear as torchvision's resize: the
    native uint8 kernel on AVX2 / AVX512 / ARM CPUs, else float32 rounded back (torchvision's rule)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64"):
        return F.interpolate(x[None], size=[height, width], mode="bilinear", align_corners=False, antialias=True)[0]
    out = F.interpolate(x[None].float(), size=[height, width], mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().to(torch.uint8)


@register_processor("Llama4ForConditionalGeneration")
class Llama4Processor(MultimodalProcessor):
    image_placeholder = "<|image|>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        pp, pc, vc = self.pp, self.processor_config, hf_config.get("vision_config") or {}
        size = pp.get("size") or {"height": 336, "width": 336}
        self.tile = int(size["height"]) if isinstance(size, dict) else int(size)
        if isinstance(size, dict) and int(size.get("width", self.tile)) != self.tile:
            raise MediaError("Llama 4's image processor needs a square size", "images")
        self.max_patches = int(pp.get("max_patches", 16))
        self.to_max_canvas = bool(pp.get("resize_to_max_canvas", False))
        resample = pp.get("resample", 2)
        if resample not in (2, None):   # transformers' default; nothing published uses another
            raise MediaError(f"Llama 4 preprocessing supports bilinear resampling only, not {resample!r}", "images")
        self.do_rescale, self.do_normalize = pp.get("do_rescale", True), pp.get("do_normalize", True)
        self.rescale_factor = float(pp.get("rescale_factor", 1 / 255))
        self.mean, self.std = pp.get("image_mean") or [0.5] * 3, pp.get("image_std") or [0.5] * 3
        patch = int(pc.get("patch_size") or vc.get("patch_size", 14))
        ratio = float(pc.get("pixel_shuffle_ratio") or vc.get("pixel_shuffle_ratio", 0.5))
        self.rows_per_tile = (self.tile // patch) ** 2 // round(1.0 / ratio ** 2)
        self.canvases = supported_resolutions(self.max_patches, self.tile)
        self.splicer = TokenSplicer(tokenizer)
        sp = self.splicer
        self.image_id = sp.required_id(pc.get("fake_image_token", "<|image|>"))
        self.marker_id = sp.required_id(pc.get("image_token", "<|image|>"))
        self.patch_id = sp.required_id(pc.get("patch_token", "<|patch|>"), hf_config.get("image_token_index"))
        self.start_id = sp.required_id(pc.get("start_of_image_token", "<|image_start|>"))
        self.end_id = sp.required_id(pc.get("end_of_image_token", "<|image_end|>"))
        self.x_sep: Piece = sp.marker(pc.get("tile_x_separator_token", "<|tile_x_separator|>"))
        self.y_sep: Piece = sp.marker(pc.get("tile_y_separator_token", "<|tile_y_separator|>"))
        self._settings = ("llama4", self.tile, self.max_patches, self.to_max_canvas, self.do_rescale,
                          self.do_normalize, self.rescale_factor, repr(self.mean), repr(self.std))

    # ------------------------------------------------------------------------------------- pixels
    def _rescale_normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.do_rescale and self.do_normalize:   # bfloat16 arithmetic, op by op as transformers
            y = x.to(torch.bfloat16) * self.rescale_factor
            mean = torch.as_tensor(self.mean, dtype=torch.bfloat16).view(-1, 1, 1)
            std = torch.as_tensor(self.std, dtype=torch.bfloat16).view(-1, 1, 1)
            return y.sub(mean).div_(std)
        if self.do_rescale:
            return x * self.rescale_factor
        if self.do_normalize:
            raise MediaError("Llama 4 preprocessing cannot normalise without rescaling", "images")
        return x

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """float32 [tiles (+ global), 3, S, S] and the grid (rows, cols)."""
        x = torch.from_numpy(np.array(image_ops.to_rgb_array(image), copy=True))   # writable, contiguous
        h, w = int(x.shape[1]), int(x.shape[2])
        th, tw = best_fit(h, w, self.canvases, self.to_max_canvas)
        lim_h, lim_w = (th, tw) if self.to_max_canvas else (min(max(h, self.tile), th), min(max(w, self.tile), tw))
        nh, nw = fit_without_distortion(h, w, lim_h, lim_w)
        canvas = F.pad(resize_uint8(x, nh, nw), [0, tw - nw, 0, th - nh], value=0)
        canvas = self._rescale_normalize(canvas)
        rows, cols = th // self.tile, tw // self.tile
        t = self.tile
        grid = canvas.view(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
        if rows * cols > 1:
            glob = self._rescale_normalize(resize_uint8(x, t, t))
            grid = torch.cat([grid, glob[None]])
        return grid.float().contiguous(), (rows, cols)

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        self.splicer.check_usable()
        pixels, (rows, cols) = self.tiles(image)
        return MMItem("image", content_hash(image_hash, *self._settings), {"pixel_values": pixels},
                      pixels.shape[0] * self.rows_per_tile, extra={"rows": rows, "cols": cols})

    # --------------------------------------------------------------------------------------- text
    def expansion(self, rows: int, cols: int) -> list[Piece]:
        patches: list[Piece] = [self.patch_id] * self.rows_per_tile
        out: list[Piece] = [self.start_id]
        if rows * cols > 1:
            for _ in range(rows):
                for x in range(cols):
                    out += patches
                    if x < cols - 1:
                        out.append(self.x_sep)
                out.append(self.y_sep)
        return [*out, self.marker_id, *patches, self.end_id]

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        expansions = [self.expansion(it.extra["rows"], it.extra["cols"]) for it in items]
        return expand_with(self, self.splicer, token_ids, items, self.image_id, self.patch_id, expansions)


__all__ = ["Llama4Processor", "best_fit", "fit_without_distortion", "supported_resolutions"]
