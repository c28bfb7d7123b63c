"""The processor interface every multimodal family implements, and the registry.

A processor is built once per model from its folder's ``preprocessor_config.json`` /
``processor_config.json``, the HF ``config.json`` and the tokenizer. Per request it turns each
decoded image into an ``MMItem`` (``process_image``) and then expands the prompt's placeholders on
token ids (``expand``), as the family's HF processor does, filling in each item's placeholder range.
"""
from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from mistralpy.multimodal.inputs import MediaError, MMItem


class MultimodalProcessor(ABC):
    """One family's preprocessing. ``image_placeholder`` is what a prompt (or the chat template)
    writes for one image, before expansion."""

    modalities: frozenset[str] = frozenset({"image"})
    image_placeholder: str = "<image>"

    def __init__(self, preprocessor_config: dict[str, Any], hf_config: dict[str, Any], tokenizer: Any,
                 processor_config: dict[str, Any] | None = None) -> None:
        self.pp = preprocessor_config
        self.hf_config = hf_config
        self.tokenizer = tokenizer
        self.processor_config = processor_config or {}

    @abstractmethod
    def process_image(self, image: Image.Image, image_hash: str) -> MMItem:
        """A decoded image -> its encoder inputs and embedding count. ``image_hash`` hashes the
        source bytes; the item's hash adds the processor settings that shape its inputs."""

    @abstractmethod
    def expand(self, token_ids: list[int], items: list[MMItem]) -> list[int]:
        """The prompt with each item's placeholder expanded (sets ``item.placeholder``). The number of
        placeholders must equal the number of items (else MediaError)."""

    def placeholder_count_error(self, found: int, given: int) -> MediaError:
        return MediaError(f"the prompt has {found} image placeholder(s) ({self.image_placeholder!r}) but "
                          f"{given} image(s) were given", "images")


_REGISTRY: dict[str, Callable[..., MultimodalProcessor]] = {}


def register_processor(*architectures: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        for arch in architectures:
            _REGISTRY[arch] = cls
        return cls
    return deco


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


def processor_for(architecture: str, model_dir: Path, hf_config: dict[str, Any], tokenizer: Any) -> MultimodalProcessor | None:
    """The family's processor for a model folder, or None for a text-only architecture."""
    from mistralpy.multimodal.processors import families  # noqa: F401  (registers the families)

    cls = _REGISTRY.get(architecture)
    if cls is None:
        return None
    pp = _read(model_dir / "preprocessor_config.json")
    proc = _read(model_dir / "processor_config.json")
    if not pp and isinstance(proc.get("image_processor"), dict):
        pp = proc["image_processor"]   # transformers 5 writes the image processor inside processor_config.json
    kwargs = {}
    if "video_preprocessor_config" in inspect.signature(cls).parameters:   # video families (Qwen-VL)
        kwargs["video_preprocessor_config"] = _read(model_dir / "video_preprocessor_config.json") or None
    return cls(pp, hf_config, tokenizer, proc, **kwargs)
