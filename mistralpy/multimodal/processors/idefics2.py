"""Idefics2 preprocessing, equal to transformers' ``Idefics2ImageProcessorPil`` + ``Idefics2Processor``.

Pixels: optionally split the image into its 4 quarters plus the whole image (``do_image_splitting``),
resize each so the longest side is at most ``size.longest_edge`` and no side is under
``size.shortest_edge`` (aspect kept, then clamped), rescale, normalize, zero-pad to the largest
frame with a ``pixel_attention_mask``. Each frame yields ``image_seq_len`` perceiver latents.

Text: ``<image>`` -> ``<fake_token_around_image>`` + ``<image>`` x image_seq_len +
``<fake_token_around_image>`` (x5 when splitting), then HF's two clean-ups of the whole prompt:
adjacent fake tokens collapse into one (``str.replace``, so also between adjacent images) and a
space is inserted after a fake token followed by a character other than whitespace or "<" (the
following text is re-tokenized with it, as HF tokenizes it).
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image

from mistralpy.multimodal.inputs import MediaError, MMItem, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor
from mistralpy.multimodal.processors.idefics3 import pad_tiles
from mistralpy.multimodal.processors.image_ops import rescale_normalize
from mistralpy.multimodal.processors.splice import Piece, SpliceElement, TokenSplicer, expand_with

_SPACE_AFTER = re.compile(r"[^\s<]")   # Idefics2Processor's closing_fake_pattern lookahead


def _resize_size(height: int, width: int, size: dict[str, Any]) -> tuple[int, int]:
    """transformers' Idefics2 get_resize_output_image_size (or a fixed height x width)."""
    if size.get("shortest_edge") and size.get("longest_edge"):
        min_len, max_len = int(size["shortest_edge"]), int(size["longest_edge"])
        aspect = width / height
        if width >= height and width > max_len:
            width = max_len
            height = int(width / aspect)
        elif height > width and height > max_len:
            height = max_len
            width = int(height * aspect)
        return max(height, min_len), max(width, min_len)
    if size.get("height") and size.get("width"):
        return int(size["height"]), int(size["width"])
    raise MediaError(f"unsupported Idefics2 image size setting {size!r}", "images")


def idefics2_frames(image: Image.Image, pp: dict[str, Any]) -> list[np.ndarray]:
    """Float32 [3, h, w] frames (4 quarters + the whole image when splitting), unpadded."""
    img = image_ops.to_rgb_array(image)
    frames = [img]
    if pp.get("do_image_splitting", False):
        h, w = img.shape[1:]
        if h < 2:   # the top quarters would have no rows: transformers divides by zero there
            raise MediaError(f"image of {w}x{h} pixels is too small to split into quarters", "images")
        # (w == 1 leaves the left quarters empty; PIL resizes them to black, as in transformers.)
        mh, mw = h // 2, w // 2
        frames = [img[:, :mh, :mw], img[:, :mh, mw:], img[:, mh:, :mw], img[:, mh:, mw:], img]
    if pp.get("do_resize", True):
        size = pp.get("size") or {"shortest_edge": 378, "longest_edge": 980}
        resample = pp.get("resample", 2)   # BILINEAR
        frames = [image_ops.resize(f, *_resize_size(f.shape[1], f.shape[2], size), resample) for f in frames]
    return [rescale_normalize(f, pp) for f in frames]


@register_processor("Idefics2ForConditionalGeneration")
class Idefics2Processor(MultimodalProcessor):
    """Idefics2 images: one frame (or 4 quarters + the image), image_seq_len latents each."""

    image_placeholder = "<image>"
    fake_token = "<fake_token_around_image>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        n = self.processor_config.get("image_seq_len")
        if not (isinstance(n, int) and n > 0):
            n = (hf_config.get("perceiver_config") or {}).get("resampler_n_latents", 64)
        self.image_seq_len = int(n)
        self.splicer = TokenSplicer(tokenizer)
        self.image_id = self.splicer.required_id(self.image_placeholder, hf_config.get("image_token_id"))
        self.fake_id = self.splicer.required_id(self.fake_token)
        self.split = bool(self.pp.get("do_image_splitting", False))
        pp = self.pp
        self._settings = ("idefics2", self.split, pp.get("do_resize", True), repr(pp.get("size")),
                          pp.get("resample", 2), pp.get("do_rescale", True), pp.get("rescale_factor", 1 / 255),
                          pp.get("do_normalize", True), repr(pp.get("image_mean")), repr(pp.get("image_std")))

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        self.splicer.check_usable()
        frames = idefics2_frames(image, self.pp)
        # Padded to this image's own largest frame; HF pads a batch to its largest image, which
        # changes only the padding the vision encoder masks out.
        pixels, mask = pad_tiles(frames)
        return MMItem("image", content_hash(image_hash, *self._settings),
                      {"pixel_values": pixels, "pixel_attention_mask": mask},
                      num_embeds=len(frames) * self.image_seq_len, extra={"frames": len(frames)})

    def expansion(self) -> list[Piece]:
        one: list[Piece] = [self.fake_id, *([self.image_id] * self.image_seq_len), self.fake_id]
        return one * (5 if self.split else 1)   # the doubled fakes collapse in _normalize

    def _normalize(self, elements: list[SpliceElement]) -> list[SpliceElement]:
        """Idefics2Processor's text clean-ups, on the whole prompt."""
        def is_fake(el: SpliceElement) -> bool:
            return el.kind == "bar" and el.ids[0] == self.fake_id

        merged: list[SpliceElement] = []
        i = 0
        while i < len(elements):   # "<fake><fake>" -> "<fake>", left to right, non-overlapping
            merged.append(elements[i])
            i += 2 if is_fake(elements[i]) and i + 1 < len(elements) and is_fake(elements[i + 1]) else 1
        out: list[SpliceElement] = []
        for n, el in enumerate(merged):
            out.append(el)
            if is_fake(el) and n + 1 < len(merged) and _SPACE_AFTER.match(self.splicer.element_text(merged[n + 1])):
                out.append(SpliceElement("text", text=" "))
        return out

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        expansions = [self.expansion() for _ in items]
        return expand_with(self, self.splicer, token_ids, items, self.image_id, self.image_id, expansions,
                           normalize=self._normalize)


__all__ = ["Idefics2Processor", "idefics2_frames"]
