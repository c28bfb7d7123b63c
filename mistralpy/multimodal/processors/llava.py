"""LLaVA 1.5: CLIP preprocessing (shortest-edge resize, centre crop; optional pad-to-square) and one
``<image>`` expanded to the vision tower's patch count (transformers' LlavaProcessor)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from mistralpy.multimodal.inputs import MMItem, PlaceholderRange, content_hash
from mistralpy.multimodal.processors import image_ops
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor


def _hw(size: dict[str, int] | int | None, default: int) -> dict[str, int]:
    if size is None:
        return {"shortest_edge": default}
    if isinstance(size, int):
        return {"shortest_edge": size}
    return dict(size)


def read_clip_settings(proc: MultimodalProcessor, pp: dict[str, Any], vc: dict[str, Any]) -> None:
    """The CLIP-processor switches and constants LLaVA and LLaVA-NeXT share (transformers' defaults)."""
    proc.do_resize = pp.get("do_resize", True)
    proc.do_center_crop = pp.get("do_center_crop", True)
    proc.resample = int(pp.get("resample", 3))
    proc.rescale_factor = float(pp.get("rescale_factor", 1 / 255))
    proc.mean = tuple(pp.get("image_mean", image_ops.OPENAI_CLIP_MEAN))
    proc.std = tuple(pp.get("image_std", image_ops.OPENAI_CLIP_STD))
    proc.patch = int(vc.get("patch_size", 14))


def config_image_token_id(hf_config: dict[str, Any], tokenizer: Any, placeholder: str) -> int:
    """The image token: the config's ``image_token_id`` / ``image_token_index``, else the tokenizer's."""
    token_id = hf_config.get("image_token_id", hf_config.get("image_token_index"))
    return int(token_id if token_id is not None else tokenizer.token_to_id(placeholder))


@register_processor("LlavaForConditionalGeneration")
class LlavaProcessor(MultimodalProcessor):
    image_placeholder = "<image>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        pp, vc = self.pp, hf_config.get("vision_config") or {}
        image_size = int(vc.get("image_size", 224))
        self.size = _hw(pp.get("size"), image_size)
        crop = pp.get("crop_size") or {"height": image_size, "width": image_size}
        self.crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        self.do_pad = pp.get("do_pad", False)
        read_clip_settings(self, pp, vc)
        self.strategy = hf_config.get("vision_feature_select_strategy", "default")
        self.image_token_id = config_image_token_id(hf_config, tokenizer, self.image_placeholder)

    def _settings(self) -> tuple:
        return ("llava", tuple(sorted(self.size.items())), self.crop, self.do_resize, self.do_center_crop,
                self.do_pad, self.resample, self.rescale_factor, self.mean, self.std)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """float32 [3, H, W] as LlavaImageProcessorPil computes them."""
        x = image_ops.to_rgb_array(image)
        if self.do_pad:
            x = _pad_to_square(x, tuple(int(m * 255) for m in self.mean))
        if self.do_resize:
            if "shortest_edge" in self.size:
                h, w = image_ops.shortest_edge_size(x.shape[1], x.shape[2], self.size["shortest_edge"])
            else:
                h, w = self.size["height"], self.size["width"]
            x = image_ops.resize(x, h, w, self.resample)
        if self.do_center_crop:
            x = image_ops.center_crop(x, *self.crop)
        return image_ops.normalize(image_ops.rescale(x, self.rescale_factor), self.mean, self.std)

    def num_image_tokens(self, height: int, width: int) -> int:
        n = (height // self.patch) * (width // self.patch) + 1   # + the CLS position
        return n - 1 if self.strategy == "default" else n

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        px = torch.from_numpy(np.ascontiguousarray(self.pixels(image)))[None]
        n = self.num_image_tokens(px.shape[-2], px.shape[-1])
        return MMItem("image", content_hash(image_hash, self._settings()), {"pixel_values": px}, n)

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        return expand_repeated(self, token_ids, items, self.image_token_id)


def expand_repeated(proc: MultimodalProcessor, token_ids: list[int], items: list[MMItem], token_id: int) -> list[int]:
    """Each occurrence of ``token_id`` becomes item.num_embeds copies of it (LLaVA, Qwen-VL style)."""
    found = token_ids.count(token_id)
    if found != len(items):
        raise proc.placeholder_count_error(found, len(items))
    out: list[int] = []
    it = iter(items)
    for t in token_ids:
        if t != token_id:
            out.append(t)
            continue
        item = next(it)
        item.placeholder = PlaceholderRange(len(out), item.num_embeds)
        out.extend([token_id] * item.num_embeds)
    return out


def _pad_to_square(x: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    c, h, w = x.shape
    if h == w:
        return x
    m = max(h, w)
    out = np.empty((c, m, m), dtype=x.dtype)
    out[:] = np.asarray(color, dtype=x.dtype)[:, None, None]
    if w > h:
        s = (m - h) // 2
        out[:, s:s + h, :] = x
    else:
        s = (m - w) // 2
        out[:, :, s:s + w] = x
    return out
