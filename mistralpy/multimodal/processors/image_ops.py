"""Image operations with the arithmetic of transformers' PIL backend, so pixel values match it.

Images travel as uint8 [C, H, W] numpy arrays until ``rescale`` makes them float32 (computed in
float64, then rounded, as transformers does); ``normalize`` is float32 ``(x - mean) / std``.
Resizing goes through PIL on the uint8 image (PIL's own resampling filters and reducing gap).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

# PIL resampling codes as preprocessor_config.json writes them (0 nearest, 2 bilinear, 3 bicubic, 1 lanczos)
RESAMPLE = {0: Image.Resampling.NEAREST, 1: Image.Resampling.LANCZOS, 2: Image.Resampling.BILINEAR,
            3: Image.Resampling.BICUBIC, 4: Image.Resampling.BOX, 5: Image.Resampling.HAMMING}

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 [3, H, W]; transparency is composited onto white (transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    else:
        image = image.convert("RGB")
    return np.moveaxis(np.asarray(image), -1, 0)


def resize(image: np.ndarray, height: int, width: int, resample: int | Image.Resampling = 3,
           reducing_gap: int | None = None) -> np.ndarray:
    """uint8 [C, H, W] -> uint8 [C, height, width] through PIL."""
    if image.dtype != np.uint8:
        raise TypeError("resize takes uint8 images (resize before rescaling)")
    pil = Image.fromarray(np.ascontiguousarray(np.moveaxis(image, 0, -1)).squeeze(-1) if image.shape[0] == 1
                          else np.ascontiguousarray(np.moveaxis(image, 0, -1)))
    out = np.asarray(pil.resize((width, height), resample=RESAMPLE.get(resample, resample), reducing_gap=reducing_gap))
    if out.ndim == 2:
        out = out[..., None]
    return np.moveaxis(out, -1, 0)


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(h, w) with the short side = shortest_edge, the long side int(shortest_edge * long / short)
    (transformers' get_resize_output_image_size with default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop [C, H, W] to its centre (zero-padded where the image is smaller), as transformers does."""
    c, h, w = image.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return image[:, top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((c, new_h, new_w), dtype=image.dtype)
    top_pad, left_pad = int(np.ceil((new_h - h) / 2)), int(np.ceil((new_w - w) / 2))
    padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = image
    top, left = top + top_pad, left + left_pad
    top0, left0 = max(0, top), max(0, left)
    return padded[:, top0:min(new_h, top + height), left0:min(new_w, left + width)]


def rescale(image: np.ndarray, scale: float) -> np.ndarray:
    return (image.astype(np.float64) * scale).astype(np.float32)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [C, H, W] -> (x - mean) / std per channel, in float32."""
    image = image.astype(np.float32, copy=False)
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    return (image - m) / s


def rescale_normalize(image: np.ndarray, pp: dict[str, Any]) -> np.ndarray:
    """transformers' rescale then normalize, each where the config enables it; float32 out."""
    out: np.ndarray = image
    if pp.get("do_rescale", True):
        out = rescale(out, float(pp.get("rescale_factor", 1 / 255)))
    if pp.get("do_normalize", True):
        mean = pp.get("image_mean") or IMAGENET_STANDARD_MEAN
        std = pp.get("image_std") or IMAGENET_STANDARD_STD
        # A config may give one number for all channels.
        mean, std = ([v] * out.shape[0] if isinstance(v, (int, float)) else v for v in (mean, std))
        out = normalize(out, mean, std)
    return out.astype(np.float32, copy=False)
