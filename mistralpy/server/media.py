"""Images of a chat request, fetched before the prompt is prepared: every URL goes through the one
guarded fetcher (multimodal/fetch.py: no private addresses, redirects re-checked, size caps);
``data:`` URLs are size-checked before decoding; paths and file:// are refused."""
from __future__ import annotations

from typing import Any

from mistralpy.multimodal.inputs import MediaError


async def fetch_images(images: list[tuple[Any, str]], policy: Any, max_images: int) -> list[tuple[bytes, str]]:
    """(source, part path) pairs -> (bytes, part path); MediaError names the failing part."""
    from mistralpy.multimodal.fetch import fetch_bytes_async

    if len(images) > max_images:
        raise MediaError(f"{len(images)} images in one request; at most {max_images}", "messages")
    out = []
    for src, where in images:
        if not isinstance(src, str):
            raise MediaError(f"{where}: an image is given as a URL or a data: URL", where)
        try:
            out.append((await fetch_bytes_async(src, policy), where))
        except MediaError as exc:
            raise MediaError(f"{where}: {exc}", where) from None
    return out
