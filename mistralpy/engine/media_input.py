"""Images and videos in prompts: collected from chat parts or ``{"prompt", "images", "videos"}``
prompts, loaded (URLs through the one guarded fetcher), preprocessed by the model's family
processor and expanded on token ids. Runs on the caller's thread, so a bad image is that caller's
error (MediaError, a 400)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mistralpy.multimodal.inputs import MediaError, MMItem, content_hash

# OpenAI / vLLM / our spellings of media parts -> (modality, key holding the source)
PART_TYPES = {"image_url": ("image", "image_url"), "input_image": ("image", "image_url"), "image": ("image", "image"),
              "video_url": ("video", "video_url"), "video": ("video", "video")}


@dataclass(slots=True)
class MediaRef:
    """One media part of a request, in prompt order: its source (URL / data URL / path string,
    bytes, a PIL image, or for videos a list of frames) and where it came from (for errors)."""

    source: Any
    where: str
    modality: str = "image"


def part_source(part: dict[str, Any], where: str) -> tuple[str, Any]:
    """(modality, source) of one media part."""
    modality, key = PART_TYPES[part["type"]]
    value = part.get(key)
    if part["type"] == "input_image" and value is None:
        value = part.get("file_id")
    src = value.get("url") if isinstance(value, dict) else value
    if src is None or (isinstance(src, str) and not src.strip()):
        raise MediaError(f"{where}: the {modality} part has no {modality}", where)
    return modality, src


def split_media_parts(content: list[Any], where: str, media: list[MediaRef] | None) -> tuple[list[dict], bool]:
    """Chat content parts -> template parts ({"type": "text" | "image" | "video"}) and whether any
    media was seen; media are appended to ``media`` (None: the model takes none, they are refused)."""
    parts: list[dict] = []
    seen = False
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise MediaError(f"{here} must be an object", here)
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind in PART_TYPES:
            modality, src = part_source(part, here)
            if media is None:
                raise MediaError(f"{here}: this model does not take {modality}s", here)
            media.append(MediaRef(src, here, modality))
            parts.append({"type": modality})
            seen = True
        else:
            raise MediaError(f"{here}: unsupported content part type {kind!r}", here)
    return parts, seen


def media_refs(images: Sequence[Any] = (), videos: Sequence[Any] = ()) -> list[MediaRef]:
    """A prompt's ``images`` / ``videos`` lists (sources or MediaRefs) as MediaRefs."""
    refs = [x if isinstance(x, MediaRef) else MediaRef(x, f"images[{k}]") for k, x in enumerate(images)]
    return refs + [x if isinstance(x, MediaRef) else MediaRef(x, f"videos[{k}]", "video") for k, x in enumerate(videos)]


class MediaInput:
    """The model's processor plus the loading policy (local paths allowed: this is the Python API)."""

    def __init__(self, processor: Any, max_images: int = 8, policy: Any = None, max_edge: int | None = None) -> None:
        from mistralpy.multimodal.fetch import MediaPolicy

        self.processor = processor
        self.max_images = max_images
        self.max_edge = max_edge
        self.policy = policy or MediaPolicy(allow_local_files=True, allow_private=True)

    @property
    def placeholder(self) -> str:
        return self.processor.image_placeholder

    def items(self, ids: list[int], refs: Sequence[MediaRef]) -> tuple[list[int], list[MMItem]]:
        """(expanded prompt ids, one MMItem per image / video: images first, each kind in order)."""
        if len(refs) > self.max_images:
            raise MediaError(f"{len(refs)} images / videos in one request; at most {self.max_images}", "images")
        items = []
        for ref in sorted(refs, key=lambda r: r.modality != "image"):   # stable: each kind keeps its order
            if ref.modality == "video" and "video" not in self.processor.modalities:
                raise MediaError(f"{ref.where}: this model does not take videos", ref.where)
            try:
                items.append(self._video(ref.source) if ref.modality == "video" else self._image(ref.source))
            except MediaError as exc:
                raise MediaError(f"{ref.where}: {exc}", ref.where) from None
        return self.processor.expand(list(ids), items), items

    def _image(self, source: Any) -> MMItem:
        from mistralpy.multimodal.image_io import load_image

        image, raw = load_image(source, self.policy)
        if self.max_edge and max(image.size) > self.max_edge:   # --max-edge: shrink first, keep the aspect
            scale = self.max_edge / max(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        return self.processor.process_image(image, content_hash(raw, self.max_edge))

    def _video(self, source: Any) -> MMItem:
        """A file / URL / bytes is decoded and sampled (multimodal/video_io.py); a list of frames is
        taken as already sampled (fps 2, the processors' default)."""
        from mistralpy.multimodal.image_io import load_image
        from mistralpy.multimodal.video_io import decode_video

        if isinstance(source, (list, tuple)):
            loaded = [load_image(f, self.policy) for f in source]   # (frame, the bytes to hash)
            key = content_hash(*[raw for _, raw in loaded])
            return self.processor.process_video([frame for frame, _ in loaded], 2.0, key)
        raw = source if isinstance(source, (bytes, bytearray)) else self._fetch(source)
        video = decode_video(bytes(raw), fps=2.0)
        return self.processor.process_video(video.frames, video.fps, content_hash(bytes(raw)))

    def _fetch(self, source: Any) -> bytes:
        from mistralpy.multimodal.fetch import fetch_bytes

        if not isinstance(source, str):
            raise MediaError("a video is a path, URL, data: URL, bytes or a list of frames", "videos")
        return fetch_bytes(source, self.policy)
