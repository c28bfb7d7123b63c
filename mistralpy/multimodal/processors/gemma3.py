"""Gemma 3 preprocessing, equal to transformers' ``Gemma3ImageProcessorPil`` + ``Gemma3Processor``.

Pixels: the image (and, with pan-and-scan, its crops) resized to ``size`` (896 x 896 for the
released models; SigLIP), rescaled and normalized; each yields ``mm_tokens_per_image`` embeddings.

Text: each ``<start_of_image>`` becomes "\\n\\n<start_of_image>" + ``<image_soft_token>`` x
mm_tokens_per_image + "<end_of_image>\\n\\n"; with pan-and-scan crops, "Here is the original image
{that} and here are some crops to help you see better " + the crops' sequences joined by " ".
The "\\n\\n" pieces are text, so they tokenize together with the user's neighbouring text (BPE merges
e.g. "user\\n" + "\\n\\n" into "\\n\\n\\n"); the splicer re-encodes those pieces as HF does. The item's
range runs from its first ``<start_of_image>`` to its last ``<end_of_image>``: the outer "\\n\\n" may
share tokens with the user's text, so they stay outside it.

Pan-and-scan: the released preprocessor configs leave it null, and ``Gemma3Processor`` then turns it
off (its call defaults override the image processor's settings). We follow the preprocessor config
where it sets a value (HF's processor would ignore a ``true`` there unless passed at call time).
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

# Gemma3Processor's call defaults (the preprocessor config writes null for these).
PAN_AND_SCAN_DEFAULTS = {"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
                         "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_ratio_to_activate": 1.2}


def pan_and_scan(image: np.ndarray, min_crop_size: int, max_num_crops: int, min_ratio: float) -> list[np.ndarray]:
    """Crops of a uint8 [C, H, W] image along its long side (none when it is not elongated enough or
    the crops would be under min_crop_size), as transformers' Gemma3 pan_and_scan."""
    height, width = image.shape[1:]
    if width >= height:
        if width / height < min_ratio:
            return []
        n_w = math.floor(width / height + 0.5)
        n_w = min(math.floor(width / min_crop_size), n_w)
        n_w, n_h = min(max_num_crops, max(2, n_w)), 1
    else:
        if height / width < min_ratio:
            return []
        n_h = math.floor(height / width + 0.5)
        n_h = min(math.floor(height / min_crop_size), n_h)
        n_h, n_w = min(max_num_crops, max(2, n_h)), 1
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < min_crop_size:
        return []
    return [image[:, y:y + crop_h, x:x + crop_w]
            for y in (crop_h * i for i in range(n_h)) for x in (crop_w * j for j in range(n_w))]


@register_processor("Gemma3ForConditionalGeneration")
class Gemma3Processor(MultimodalProcessor):
    """Gemma 3 images: one SigLIP view (plus pan-and-scan crops), soft tokens between BOI / EOI."""

    image_placeholder = "<start_of_image>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        pp = self.pp
        n = self.processor_config.get("image_seq_length") or pp.get("image_seq_length") \
            or hf_config.get("mm_tokens_per_image") or 256
        self.tokens_per_image = int(n)
        size = pp.get("size") or {"height": 224, "width": 224}
        self.height, self.width = int(size["height"]), int(size["width"])
        self.resample = pp.get("resample", 2)   # BILINEAR
        self.pas = {k: (pp[k] if pp.get(k) is not None else v) for k, v in PAN_AND_SCAN_DEFAULTS.items()}
        self.splicer = TokenSplicer(tokenizer)
        cfg = hf_config.get
        self.boi_id = self.splicer.required_id("<start_of_image>", cfg("boi_token_index", cfg("boi_token_id")))
        self.eoi_id = self.splicer.required_id("<end_of_image>", cfg("eoi_token_index", cfg("eoi_token_id")))
        self.soft_id = self.splicer.required_id("<image_soft_token>", cfg("image_token_index", cfg("image_token_id")))
        self._settings = ("gemma3", pp.get("do_resize", True), self.height, self.width, self.resample,
                          pp.get("do_rescale", True), pp.get("rescale_factor", 1 / 255), pp.get("do_normalize", True),
                          repr(pp.get("image_mean")), repr(pp.get("image_std")), tuple(sorted(self.pas.items())))

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        self.splicer.check_usable()
        img = image_ops.to_rgb_array(image)
        crops = []
        if self.pas["do_pan_and_scan"]:
            crops = pan_and_scan(img, int(self.pas["pan_and_scan_min_crop_size"]),
                                 int(self.pas["pan_and_scan_max_num_crops"]),
                                 float(self.pas["pan_and_scan_min_ratio_to_activate"]))
        views = []
        for view in [img, *crops]:
            if self.pp.get("do_resize", True):
                view = image_ops.resize(view, self.height, self.width, self.resample)
            views.append(rescale_normalize(view, self.pp))
        pixels = torch.from_numpy(np.stack(views))
        return MMItem("image", content_hash(image_hash, *self._settings), {"pixel_values": pixels},
                      num_embeds=len(views) * self.tokens_per_image, extra={"num_crops": len(crops)})

    def expansion(self, num_crops: int) -> list[Piece]:
        """Gemma3Processor.replace_image_token's text as pieces."""
        full: list[Piece] = ["\n\n", self.boi_id, *([self.soft_id] * self.tokens_per_image), self.eoi_id, "\n\n"]
        if not num_crops:
            return full
        pieces: list[Piece] = ["Here is the original image ", *full,
                               " and here are some crops to help you see better "]
        for n in range(num_crops):
            pieces += ([" "] if n else []) + full
        return pieces

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        expansions = [self.expansion(it.extra["num_crops"]) for it in items]
        return expand_with(self, self.splicer, token_ids, items, self.boi_id, self.soft_id, expansions)


__all__ = ["PAN_AND_SCAN_DEFAULTS", "Gemma3Processor", "pan_and_scan"]
