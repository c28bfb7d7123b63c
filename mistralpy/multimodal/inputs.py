"""What a request's media become: items with a content hash, encoder inputs and a placeholder run.

A family's processor (``multimodal/processors/``) turns each image into an ``MMItem`` (its encoder
inputs and how many embeddings the encoder yields), then expands the prompt's placeholder token(s)
on token ids exactly as the family's HF processor does, recording each item's ``PlaceholderRange``.
The engine scatters the item's encoder output into the decoder's input embeddings at the positions
of its range that take embeddings (``embed_positions``), whatever chunk of the prompt runs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from mistralpy.errors import InvalidRequestError


class MediaError(InvalidRequestError):
    """A media part cannot be used: not an image, unsupported format, too large, unreachable,
    forbidden address, too many items, or media sent to a model without that modality.
    ``field`` names the part (e.g. ``messages[0].content[1]``); the server answers 400."""


@dataclass(frozen=True, slots=True)
class PlaceholderRange:
    """Prompt positions [offset, offset + length) belong to one item. ``embed_mask`` (length
    ``length``) says which of them take the item's embeddings, in order; None means all of them
    (e.g. Idefics3's row / column marker tokens inside the run keep their own embeddings)."""

    offset: int
    length: int
    embed_mask: tuple[bool, ...] | None = None

    def embed_positions(self) -> list[int]:
        """Absolute prompt positions that take embeddings, in the order of the encoder's rows."""
        if self.embed_mask is None:
            return list(range(self.offset, self.offset + self.length))
        return [self.offset + i for i, m in enumerate(self.embed_mask) if m]

    @property
    def num_embeds(self) -> int:
        return self.length if self.embed_mask is None else sum(self.embed_mask)


@dataclass(slots=True)
class MMItem:
    """One image (or video, or audio clip) of a request, after its family's preprocessing."""

    modality: str                                  # "image" | "video" | "audio"
    hash: str                                      # content + size + processor settings (hex)
    inputs: dict[str, Any]                         # encoder inputs: pixel_values, image_grid_thw, ...
    num_embeds: int                                # rows the encoder yields for this item
    placeholder: PlaceholderRange | None = None    # set by the processor's expansion
    extra: dict[str, Any] = field(default_factory=dict)  # per-family details (e.g. rows x cols of crops)


def content_hash(*parts: bytes | str | int | float | tuple | None) -> str:
    """A stable hex digest of media bytes and the settings that shape their encoder input."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, bytes):
            h.update(b"b"); h.update(len(p).to_bytes(8, "little")); h.update(p)
        else:
            s = repr(p).encode()
            h.update(b"r"); h.update(len(s).to_bytes(8, "little")); h.update(s)
    return h.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()
