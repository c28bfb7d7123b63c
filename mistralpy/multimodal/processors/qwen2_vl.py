"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL(-MoE) preprocessing, as transformers 5.24 does it.

Images (``Qwen2VLImageProcessorPil``, all three versions): RGB, ``smart_resize`` to multiples of
patch_size * merge_size inside [min_pixels, max_pixels], PIL resize, rescale, normalize, then the
patch flattening: pixel_values [grid_h * grid_w, C * temporal_patch_size * patch**2] (the one frame
repeated over the temporal patch), rows ordered by merge window, image_grid_thw [[1, gh, gw]].

Videos (``Qwen2VLVideoProcessor`` / ``Qwen3VLVideoProcessor``) for frames already sampled: their
resize is torchvision's, i.e. ``torch.nn.functional.interpolate`` (uint8 bicubic with antialias),
the normalization is fused ((x - 255 mean) / (255 std) in float32), T is padded to a multiple of
temporal_patch_size with the last frame. Qwen3-VL sizes frames with the frame count in the pixel
budget. Qwen2.5-VL adds second_per_grid_ts = temporal_patch_size / fps; Qwen3-VL writes each
temporal patch as ``<{t:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>``.

Settings come from the image processor config (``min_pixels`` / ``max_pixels`` override
``size.shortest_edge`` / ``size.longest_edge``); a missing patch / merge / temporal size falls back
to ``vision_config``, then to transformers' class defaults. The video config is, as transformers
looks for it: ``video_preprocessor_config`` (video_preprocessor_config.json, passed by the caller),
``processor_config["video_processor"]``, then the image config, over the video class defaults.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mistralpy.multimodal.inputs import MediaError, MMItem, PlaceholderRange, content_hash
from mistralpy.multimodal.mrope import mrope_positions
from mistralpy.multimodal.processors.base import MultimodalProcessor, register_processor
from mistralpy.multimodal.processors.image_ops import (
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    normalize,
    rescale,
    resize,
    to_rgb_array,
)

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"

_MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl"}
_ARCH_VERSIONS = {"Qwen2VLForConditionalGeneration": "qwen2_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
                  "Qwen3VLForConditionalGeneration": "qwen3_vl", "Qwen3VLMoeForConditionalGeneration": "qwen3_vl"}

# transformers' class defaults. Images: one class (Qwen2VLImageProcessor) for every version.
_IMAGE_DEFAULTS: dict[str, Any] = {
    "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD}
_VIDEO_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen2_vl": {"min_pixels": 128 * 28 * 28, "max_pixels": 28 * 28 * 768, "patch_size": 14,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": OPENAI_CLIP_MEAN,
                 "image_std": OPENAI_CLIP_STD},
    "qwen3_vl": {"min_pixels": 128 * 32 * 32, "max_pixels": 32 * 32 * 768, "patch_size": 16,
                 "temporal_patch_size": 2, "merge_size": 2, "image_mean": IMAGENET_STANDARD_MEAN,
                 "image_std": IMAGENET_STANDARD_STD},
}
_VIDEO_DEFAULTS["qwen2_5_vl"] = _VIDEO_DEFAULTS["qwen2_vl"]   # Qwen2.5-VL uses Qwen2VLVideoProcessor
_DEFAULT_FPS = 24.0   # what transformers assumes when a video's fps is unknown
# torchvision's interpolation for PIL resample codes (transformers' pil_torch_interpolation_mapping)
_TORCH_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(h, w), multiples of factor, pixel count within [min_pixels, max_pixels], aspect kept (transformers')."""
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is over 200", "images")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video_qwen3(num_frames: int, height: int, width: int, temporal_factor: int, factor: int,
                             min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video variant: the frame count is part of the pixel budget; tiny frames scale up first."""
    if num_frames < temporal_factor:
        raise MediaError(f"a video needs at least {temporal_factor} frames, got {num_frames}", "videos")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise MediaError(f"video aspect ratio {max(height, width) / min(height, width):.1f} is over 200", "videos")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(frames: np.ndarray | torch.Tensor, patch: int, merge: int,
             temporal: int) -> tuple[torch.Tensor, int, int, int]:
    """[T, C, H, W] float32 -> ([gt*gh*gw, C*temporal*patch*patch], gt, gh, gw); T padded with the last frame.
    Rows run over (t, h-window, w-window, h-in-window, w-in-window), columns over (C, t, ph, pw)."""
    x = torch.as_tensor(frames, dtype=torch.float32)
    if pad := -x.shape[0] % temporal:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    t, c, h, w = x.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = x.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch).contiguous(), gt, gh, gw


@dataclass(frozen=True, slots=True)
class VisionSettings:
    """What shapes one modality's pixels (and therefore goes into the item hash)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    rescale_factor: float
    resample: int
    do_resize: bool
    do_rescale: bool
    do_normalize: bool

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def _settings(cfg: dict[str, Any], defaults: dict[str, Any], vision: dict[str, Any]) -> VisionSettings:
    size = cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
    # transformers: min_pixels / max_pixels given at the top level override size.shortest_edge / longest_edge
    min_px = cfg.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or defaults["min_pixels"]
    max_px = cfg.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or defaults["max_pixels"]

    def pick(key: str, vision_key: str) -> int:
        return int(cfg.get(key) or vision.get(vision_key) or defaults[key])

    def triple(key: str) -> tuple[float, ...]:   # a config may give one number for all channels
        v = cfg.get(key) or defaults[key]
        return (float(v),) * 3 if isinstance(v, (int, float)) else tuple(float(x) for x in v)

    return VisionSettings(
        min_pixels=int(min_px), max_pixels=int(max_px), patch_size=pick("patch_size", "patch_size"),
        temporal_patch_size=pick("temporal_patch_size", "temporal_patch_size"),
        merge_size=pick("merge_size", "spatial_merge_size"),
        image_mean=triple("image_mean"), image_std=triple("image_std"),
        rescale_factor=float(cfg.get("rescale_factor", 1 / 255)), resample=int(cfg.get("resample", 3)),
        do_resize=bool(cfg.get("do_resize", True)), do_rescale=bool(cfg.get("do_rescale", True)),
        do_normalize=bool(cfg.get("do_normalize", True)))


def _video_to_uint8_tchw(frames: Any) -> torch.Tensor:
    """Frames -> uint8 [T, C, H, W] as transformers stacks them (np.array of each PIL frame). PIL modes that
    transformers cannot stack into channels (L, P, LA, I, ...) are converted to RGB / RGBA first."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        arr = np.asarray(frames)
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
            raise MediaError(f"a video array must be [T, H, W, C] with C in (1, 3, 4), got {arr.shape}", "videos")
    else:
        frames = list(frames)
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise MediaError("a video must be a non-empty list of PIL images or a [T, H, W, C] uint8 array", "videos")
        conv = []
        for f in frames:
            if f.mode not in ("RGB", "RGBA"):
                transparent = "A" in f.getbands() or f.info.get("transparency") is not None
                f = f.convert("RGBA" if transparent else "RGB")
            conv.append(np.asarray(f))
        if len({a.shape for a in conv}) != 1:
            raise MediaError("all frames of a video must have the same size and mode", "videos")
        arr = np.stack(conv)
    if arr.dtype != np.uint8:
        raise MediaError(f"video frames must be uint8, got {arr.dtype}", "videos")
    if arr.shape[0] == 0:
        raise MediaError("a video needs at least one frame", "videos")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()


def _video_to_rgb(video: torch.Tensor) -> torch.Tensor:
    """transformers' video convert_to_rgb: grey repeated; alpha blended on white in float32 (if any < 255)."""
    c = video.shape[1]
    if c == 1:
        return video.repeat(1, 3, 1, 1)
    if c == 4:
        if not (video[:, 3] < 255).any():
            return video[:, :3]
        alpha = video[:, 3:4] / 255.0
        return (1 - alpha) * 255 + alpha * video[:, :3]
    return video


def _torch_resize(video: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize(antialias=True) on [T, C, H, W] (uint8 or float32)."""
    if (height, width) == tuple(video.shape[-2:]):
        return video
    mode = _TORCH_MODES.get(resample)
    if mode is None:
        raise MediaError(f"video resample mode {resample} is not supported (nearest, bilinear, bicubic)", "videos")
    native = video.dtype == torch.float32 or mode in ("nearest-exact", "bicubic") or (
        mode == "bilinear" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    x = video if native else video.to(torch.float32)
    kw: dict[str, Any] = {} if mode == "nearest-exact" else {"align_corners": False, "antialias": True}
    x = F.interpolate(x, size=[height, width], mode=mode, **kw)
    if not native:
        x = x.round_().to(video.dtype)
    return x


@register_processor("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                    "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
class Qwen2VLProcessor(MultimodalProcessor):
    """The Qwen-VL family's images and videos, placeholder expansion on token ids, and M-RoPE positions."""

    modalities = frozenset({"image", "video"})
    image_placeholder = VISION_START + IMAGE_PAD + VISION_END
    video_placeholder = VISION_START + VIDEO_PAD + VISION_END

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None,
                 video_preprocessor_config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocessor_config, hf_config, tokenizer, processor_config)
        self.version = self._version(hf_config)
        vision = hf_config.get("vision_config") or {}
        self.image_settings = _settings(preprocessor_config, _IMAGE_DEFAULTS, vision)
        video_cfg = (video_preprocessor_config or self.processor_config.get("video_processor")
                     or preprocessor_config)
        self.video_settings = _settings(video_cfg, _VIDEO_DEFAULTS[self.version], vision)
        self.spatial_merge_size = int(vision.get("spatial_merge_size") or self.image_settings.merge_size)
        self.tokens_per_second = vision.get("tokens_per_second", 4) if self.version == "qwen2_5_vl" else None
        self.image_token_id = self._token_id(IMAGE_PAD, "image_token_id")
        self.video_token_id = self._token_id(VIDEO_PAD, "video_token_id")
        self.vision_start_token_id = self._token_id(VISION_START, "vision_start_token_id")
        self.vision_end_token_id = self._token_id(VISION_END, "vision_end_token_id")

    @staticmethod
    def _version(hf_config: dict[str, Any]) -> str:
        if (v := _MODEL_TYPES.get(hf_config.get("model_type", ""))) is not None:
            return v
        for arch in hf_config.get("architectures") or []:
            if arch in _ARCH_VERSIONS:
                return _ARCH_VERSIONS[arch]
        return "qwen2_vl"

    def _token_id(self, token: str, config_key: str) -> int | None:
        """The tokenizer's id for a special token (what the prompt was encoded with), else the config's."""
        tid = self.tokenizer.token_to_id(token) if self.tokenizer is not None else None
        return tid if tid is not None else self.hf_config.get(config_key)

    # ---- pixels ----------------------------------------------------------------------------------------

    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        s = self.image_settings
        arr = to_rgb_array(image)
        if s.do_resize:
            h, w = smart_resize(arr.shape[1], arr.shape[2], s.factor, s.min_pixels, s.max_pixels)
            arr = resize(arr, h, w, s.resample)
        elif arr.shape[1] % s.factor or arr.shape[2] % s.factor:
            raise MediaError(f"with do_resize off, image sides must be multiples of {s.factor}", "images")
        x: np.ndarray = arr
        if s.do_rescale:
            x = rescale(x, s.rescale_factor)
        if s.do_normalize:
            x = normalize(x, s.image_mean, s.image_std)
        # a still image is one frame repeated over the temporal patch
        pixels, _, gh, gw = patchify(np.asarray(x, dtype=np.float32)[None], s.patch_size, s.merge_size,
                                     s.temporal_patch_size)
        grid = torch.tensor([[1, gh, gw]], dtype=torch.int64)
        return MMItem(modality="image", hash=content_hash(image_hash, "qwen-vl-image", repr(s)),
                      inputs={"pixel_values": pixels, "image_grid_thw": grid},
                      num_embeds=gh * gw // s.merge_size ** 2)

    def process_video(self, frames: list[Image.Image] | np.ndarray, fps: float | None, video_hash: str) -> MMItem:
        """Frames already sampled (a list of PIL images or uint8 [T, H, W, C]) at ``fps`` frames per second
        (None: transformers' 24) -> one video item."""
        s = self.video_settings
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise MediaError(f"a video's fps must be a positive number, got {fps}", "videos")
        video = _video_to_rgb(_video_to_uint8_tchw(frames))
        t, _, h, w = video.shape
        if s.do_resize:
            if self.version == "qwen3_vl":
                rh, rw = smart_resize_video_qwen3(t, h, w, s.temporal_patch_size, s.factor, s.min_pixels, s.max_pixels)
            else:
                rh, rw = smart_resize(h, w, s.factor, s.min_pixels, s.max_pixels)
            video = _torch_resize(video, rh, rw, s.resample)
        elif h % s.factor or w % s.factor:
            raise MediaError(f"with do_resize off, video sides must be multiples of {s.factor}", "videos")
        x = self._video_rescale_normalize(video)
        pixels, gt, gh, gw = patchify(x, s.patch_size, s.merge_size, s.temporal_patch_size)
        fps_used = float(fps) if fps is not None else _DEFAULT_FPS
        inputs: dict[str, Any] = {"pixel_values_videos": pixels,
                                  "video_grid_thw": torch.tensor([[gt, gh, gw]], dtype=torch.int64)}
        extra: dict[str, Any] = {"fps": fps_used, "num_frames": t}
        if self.version == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.tensor([s.temporal_patch_size / fps_used], dtype=torch.float32)
        if self.version == "qwen3_vl":
            extra["timestamps"] = self._timestamps(t, fps_used, s.temporal_patch_size)
        return MMItem(modality="video", hash=content_hash(video_hash, "qwen-vl-video", self.version, fps_used, repr(s)),
                      inputs=inputs, num_embeds=gt * gh * gw // s.merge_size ** 2, extra=extra)

    def _video_rescale_normalize(self, video: torch.Tensor) -> torch.Tensor:
        """transformers' fused rescale + normalize of its torchvision backend, in float32."""
        s = self.video_settings
        if s.do_normalize:
            mean, std = torch.tensor(s.image_mean), torch.tensor(s.image_std)
            if s.do_rescale:
                mean, std = mean * (1.0 / s.rescale_factor), std * (1.0 / s.rescale_factor)
            return (video.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        if s.do_rescale:
            return video * s.rescale_factor
        return video.to(torch.float32)

    @staticmethod
    def _timestamps(num_frames: int, fps: float, temporal: int) -> list[float]:
        """Qwen3VLProcessor._calculate_timestamps for frames 0..T-1: the mean time of each temporal patch."""
        idx = list(range(num_frames))
        idx += [idx[-1]] * (-len(idx) % temporal)
        ts = [i / fps for i in idx]
        return [(ts[i] + ts[i + temporal - 1]) / 2 for i in range(0, len(ts), temporal)]

    # ---- prompt ----------------------------------------------------------------------------------------

    def _video_tokens(self, item: MMItem) -> tuple[list[int], tuple[bool, ...] | None]:
        """A video's expansion of one <|video_pad|> and which of its tokens take embeddings."""
        if self.version != "qwen3_vl":
            return [self.video_token_id] * item.num_embeds, None
        gt = int(item.inputs["video_grid_thw"][0, 0])
        per_frame = item.num_embeds // gt
        stamps = item.extra.get("timestamps") or self._timestamps(
            int(item.extra.get("num_frames", gt * self.video_settings.temporal_patch_size)),
            float(item.extra.get("fps", _DEFAULT_FPS)), self.video_settings.temporal_patch_size)
        ids: list[int] = []
        mask: list[bool] = []
        for t in stamps[:gt]:
            text = self.tokenizer.encode(f"<{t:.1f} seconds>", add_special_tokens=False)
            frame = [self.vision_start_token_id, *([self.video_token_id] * per_frame), self.vision_end_token_id]
            ids += text + frame
            mask += [False] * (len(text) + 1) + [True] * per_frame + [False]
        return ids, tuple(mask)

    def _first_stamp(self, item: MMItem) -> str:
        gt = int(item.inputs["video_grid_thw"][0, 0])
        stamps = item.extra.get("timestamps") or self._timestamps(
            int(item.extra.get("num_frames", gt * self.video_settings.temporal_patch_size)),
            float(item.extra.get("fps", _DEFAULT_FPS)), self.video_settings.temporal_patch_size)
        return f"<{stamps[0]:.1f} seconds>"

    def _text_run_start(self, out: list[int]) -> int:
        """Index where the plain text at the end of ``out`` begins (after its last added token)."""
        added = self._added_ids()
        k = len(out)
        while k > 0 and out[k - 1] not in added:
            k -= 1
        return k

    def _added_ids(self) -> set[int]:
        if not hasattr(self, "_added"):
            backend = getattr(self.tokenizer, "backend", None)
            decoder = backend.get_added_tokens_decoder() if backend is not None else {}
            self._added = set(decoder) | {self.vision_start_token_id, self.vision_end_token_id,
                                          self.image_token_id, self.video_token_id}
        return self._added

    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        images = [it for it in items if it.modality == "image"]
        videos = [it for it in items if it.modality == "video"]
        n_img = sum(1 for t in token_ids if t == self.image_token_id)
        n_vid = sum(1 for t in token_ids if t == self.video_token_id)
        if n_img != len(images):
            raise self.placeholder_count_error(n_img, len(images))
        if n_vid != len(videos):
            raise MediaError(f"the prompt has {n_vid} video placeholder(s) ({self.video_placeholder!r}) but "
                             f"{len(videos)} video(s) were given", "videos")
        out: list[int] = []
        img_iter, vid_iter = iter(images), iter(videos)
        skip_next = False
        for k, tid in enumerate(token_ids):
            if skip_next:
                skip_next = False
                continue
            if tid == self.image_token_id:
                item = next(img_iter)
                item.placeholder = PlaceholderRange(len(out), item.num_embeds)
                out += [self.image_token_id] * item.num_embeds
            elif tid == self.video_token_id:
                item = next(vid_iter)
                ids, mask = self._video_tokens(item)
                if (self.version == "qwen3_vl" and out and out[-1] == self.vision_start_token_id
                        and k + 1 < len(token_ids) and token_ids[k + 1] == self.vision_end_token_id):
                    # every frame brings its own <|vision_start|> ... <|vision_end|>: the template's
                    # outer pair goes (transformers >= 5.25; 5.24 kept a redundant extra pair)
                    out.pop()
                    skip_next = True
                    # the first "<t seconds>" now touches the text before it, which transformers
                    # tokenizes as one piece: re-encode that text together with it
                    start = self._text_run_start(out)
                    stamp_len = len(self.tokenizer.encode(self._first_stamp(item), add_special_tokens=False))
                    merged = self.tokenizer.encode(
                        self.tokenizer.decode(out[start:], skip_special_tokens=False) + self._first_stamp(item),
                        add_special_tokens=False)
                    ids = merged + ids[stamp_len:]
                    mask = (False,) * len(merged) + tuple(mask[stamp_len:])
                    del out[start:]
                item.placeholder = PlaceholderRange(len(out), len(ids), mask)
                out += ids
            else:
                out.append(tid)
        return out

    def positions(self, token_ids: list[int], items: list[MMItem]) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, T] and decode delta of an expanded prompt (see ``mrope.mrope_positions``)."""
        return mrope_positions(token_ids, items, self.spatial_merge_size, self.tokens_per_second, self.version)
