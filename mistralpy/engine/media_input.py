"""Images in prompts: collected from chat parts or ``{"prompt", "images"}`` prompts, loaded (through
the one guarded fetcher for URLs), preprocessed by the model's family processor and expanded on
token ids. Runs on the caller's thread, so a bad image is that caller's error (MediaError, a 400)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from mistralpy.multimodal.inputs import MediaError, MMItem, content_hash

# OpenAI / vLLM / our spellings of an image part -> where its source sits
IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def image_source(part: dict[str, Any], where: str) -> Any:
    """The source of one image part (a URL / data URL / path string, bytes or a PIL image)."""
    kind = part.get("type")
    if kind == "image_url":
        value = part.get("image_url")
        src = value.get("url") if isinstance(value, dict) else value
    elif kind == "input_image":
        src = part.get("image_url") or part.get("file_id")
    else:
        src = part.get("image")
    if src is None or (isinstance(src, str) and not src.strip()):
        raise MediaError(f"{where}: the image part has no image", where)
    return src


def split_image_parts(content: list[Any], where: str, images: list[Any] | None) -> tuple[list[dict], bool]:
    """Chat content parts -> template parts ({"type": "text"} / {"type": "image"}) and whether any
    image was seen; image sources are appended to ``images`` (None: images are refused)."""
    parts: list[dict] = []
    seen = False
    for j, part in enumerate(content):
        here = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise MediaError(f"{here} must be an object", here)
        kind = part.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind in IMAGE_PART_TYPES:
            if images is None:
                raise MediaError(f"{here}: this model does not take images", here)
            images.append((image_source(part, here), here))
            parts.append({"type": "image"})
            seen = True
        else:
            raise MediaError(f"{here}: unsupported content part type {kind!r}", here)
    return parts, seen


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

    def items(self, ids: list[int], sources: Sequence[Any]) -> tuple[list[int], list[MMItem]]:
        """(expanded prompt ids, one MMItem per image in prompt order)."""
        if len(sources) > self.max_images:
            raise MediaError(f"{len(sources)} images in one request; at most {self.max_images}", "images")
        from mistralpy.multimodal.image_io import load_image

        items = []
        for k, entry in enumerate(sources):
            src, where = entry if isinstance(entry, tuple) else (entry, f"images[{k}]")
            try:
                image, raw = load_image(src, self.policy)
            except MediaError as exc:
                raise MediaError(f"{where}: {exc}", where) from None
            if self.max_edge and max(image.size) > self.max_edge:   # --max-edge: shrink first, keep the aspect
                scale = self.max_edge / max(image.size)
                size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                image = image.resize(size, Image.Resampling.BICUBIC)
            items.append(self.processor.process_image(image, content_hash(raw, self.max_edge)))
        return self.processor.expand(list(ids), items), items
