"""Images of a chat request, fetched before the prompt is prepared: every URL goes through the one
guarded fetcher (multimodal/fetch.py: no private addresses, redirects re-checked, size caps);
``data:`` URLs are size-checked before decoding; paths and file:// are refused."""
from __future__ import annotations

from typing import Any

from mistralpy.engine.media_input import MediaRef
from mistralpy.multimodal.inputs import MediaError


async def fetch_images(media: list[MediaRef], policy: Any, max_images: int) -> list[MediaRef]:
    """The request's media parts with their sources fetched to bytes; MediaError names the failing part."""
    from mistralpy.multimodal.fetch import fetch_bytes_async

    if len(media) > max_images:
        raise MediaError(f"{len(media)} images / videos in one request; at most {max_images}", "messages")
    out = []
    for ref in media:
        if not isinstance(ref.source, str):
            raise MediaError(f"{ref.where}: a {ref.modality} is given as a URL or a data: URL", ref.where)
        try:
            out.append(MediaRef(await fetch_bytes_async(ref.source, policy), ref.where, ref.modality))
        except MediaError as exc:
            raise MediaError(f"{ref.where}: {exc}", ref.where) from None
    return out
