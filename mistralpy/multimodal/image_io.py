"""Safe image decoding: untrusted bytes in, one PIL image (first frame, EXIF-upright) out.

Only common photo / web formats are decoded (PIL's other plugins are old parsers we do not want to
expose to requests). The pixel count is checked from the header before any pixel is decoded (PIL's
``Image.open`` is lazy), so a small file claiming a huge canvas is refused without allocating it.
The mode is kept as decoded (RGBA, P, L, ...): the family processor converts to RGB, compositing
transparency onto white.
"""
from __future__ import annotations

import asyncio
import functools
import io
import os

from PIL import Image, ImageOps, UnidentifiedImageError

from mistralpy.multimodal.fetch import MediaPolicy, fetch_bytes, fetch_bytes_async
from mistralpy.multimodal.inputs import MediaError

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO")
DEFAULT_MAX_PIXELS = 64_000_000

ImageSource = Image.Image | bytes | bytearray | memoryview | str | os.PathLike[str]


@functools.cache
def _openers() -> tuple[str, ...]:
    """The accepted formats this PIL build can open. Image.open raises KeyError for a name it has
    no opener for: MPO has none (the JPEG opener returns MPO files), WEBP may be compiled out."""
    Image.init()
    return tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)


def _unidentified(data: bytes) -> MediaError:
    """Name the format when PIL knows it but we do not accept it; else it is not an image."""
    try:  # only identification (header parsing); nothing is decoded
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
    except Exception:  # noqa: BLE001 - any failure here just means "not an image"
        fmt = None
    if fmt:
        return MediaError(f"unsupported image format {fmt} (accepted: {', '.join(ALLOWED_FORMATS)})")
    return MediaError("not an image (or a corrupt one): the data matches no accepted image format")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a loaded image detached from the bytes; MediaError for anything wrong."""
    if not data:
        raise MediaError("empty image data")
    try:
        img = Image.open(io.BytesIO(data), formats=_openers())
    except UnidentifiedImageError:
        raise _unidentified(bytes(data)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for malformed headers
        raise MediaError(f"not an image (or a corrupt one): {exc}") from None
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise MediaError(f"image has an empty size {width}x{height}")
        if width * height > max_pixels:  # from the header, before any pixel is decoded
            raise MediaError(f"image is too large: {width}x{height} = {width * height} pixels, "
                             f"above the limit of {max_pixels}")
        try:  # open() leaves frame 0 current: animated GIF / WEBP / APNG, MPO and TIFF pages give
            img.load()  # their first (n_frames is not asked: it would walk every frame)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise MediaError(f"image refused as a decompression bomb: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
            raise MediaError(f"image data is truncated or corrupt: {exc}") from None
        try:
            out = ImageOps.exif_transpose(img)  # a copy, upright; detached from the file
        except Exception:  # noqa: BLE001 - a broken EXIF block must not lose a good image
            out = None
        return out if out is not None and out is not img else img.copy()
    finally:
        img.close()


def image_bytes(img: Image.Image) -> bytes:
    """A stable byte string for hashing an in-memory image: mode, size, palette and pixels."""
    palette = img.getpalette() if img.mode in ("P", "PA") else None
    head = f"pil:{img.mode}:{img.width}x{img.height}:".encode()
    return head + (bytes(palette) if palette else b"") + b":" + img.tobytes()


def _raw_bytes(source: bytes | bytearray | memoryview, policy: MediaPolicy) -> bytes:
    data = bytes(source)
    if len(data) > policy.max_bytes:
        raise MediaError(f"image data is too large: {len(data)} bytes, limit {policy.max_bytes}")
    return data


def _check_pil(img: Image.Image, max_pixels: int) -> tuple[Image.Image, bytes]:
    if img.width * img.height > max_pixels:
        raise MediaError(f"image is too large: {img.width}x{img.height} pixels, limit {max_pixels}")
    return img, image_bytes(img)


def load_image(source: ImageSource, policy: MediaPolicy,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, bytes]:
    """(image, the bytes to hash) from a PIL image, raw bytes, a data: / http(s) URL, or, when
    ``policy.allow_local_files``, a file:// URL or path. URLs go through the guarded fetcher."""
    if isinstance(source, Image.Image):
        return _check_pil(source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = _raw_bytes(source, policy)
    elif isinstance(source, (str, os.PathLike)):
        data = fetch_bytes(os.fspath(source), policy)
    else:
        raise MediaError(f"unsupported image source of type {type(source).__name__}")
    return decode_image(data, max_pixels), data


async def load_image_async(source: ImageSource, policy: MediaPolicy,
                           max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, bytes]:
    """``load_image`` for the event loop: fetched without blocking, decoded in a thread."""
    if isinstance(source, Image.Image):
        return await asyncio.to_thread(_check_pil, source, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = _raw_bytes(source, policy)
    elif isinstance(source, (str, os.PathLike)):
        data = await fetch_bytes_async(os.fspath(source), policy)
    else:
        raise MediaError(f"unsupported image source of type {type(source).__name__}")
    return await asyncio.to_thread(decode_image, data, max_pixels), data


__all__ = ["ALLOWED_FORMATS", "DEFAULT_MAX_PIXELS", "ImageSource", "decode_image", "image_bytes",
           "load_image", "load_image_async"]
