"""mistralpy.multimodal.image_io: untrusted bytes -> one upright first-frame PIL image, or MediaError;
and the fetcher's sources that need no network (data: URLs, local files). HTTP: test_media_fetch.py."""
from __future__ import annotations

import asyncio
import base64
import io
import random
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from mistralpy.multimodal.fetch import MediaPolicy, fetch_bytes, fetch_bytes_async
from mistralpy.multimodal.image_io import decode_image, image_bytes, load_image, load_image_async
from mistralpy.multimodal.inputs import MediaError

# ------------------------------------------------------------------ image makers (test_media_fetch too)

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(mode: str = "RGB", size: tuple[int, int] = (1, 1), color=None) -> bytes:
    if mode == "P":
        img = Image.new("RGB", size, color or (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = Image.new(mode, size, color if color is not None else 0)
    return encode(img, "PNG")


def jpeg_orientation6(size: tuple[int, int] = (8, 4)) -> bytes:
    """A landscape JPEG whose EXIF says "rotate 90 degrees clockwise to view"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.new("RGB", size, (0, 128, 255)), "JPEG", exif=exif.tobytes())


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height but carries almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def noise_jpeg(size: int = 64) -> bytes:
    rnd = random.Random(1)
    img = Image.frombytes("RGB", (size, size), bytes(rnd.randrange(256) for _ in range(size * size * 3)))
    return encode(img, "JPEG", quality=95)


SMALL_PNG = png("RGB", (8, 6), (250, 10, 10))


# -------------------------------------------------------------------------------------- decode_image

@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "I;16"])
def test_modes_are_kept(mode):
    img = decode_image(png(mode, (3, 2)))
    assert img.mode == mode and img.size == (3, 2)


def test_one_pixel_png_and_pixels_survive():
    img = decode_image(png("RGBA", (1, 1), (10, 20, 30, 40)))
    assert img.size == (1, 1) and img.getpixel((0, 0)) == (10, 20, 30, 40)


def test_palette_png_keeps_palette_and_transparency():
    src = Image.new("P", (4, 4), 1)
    src.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    img = decode_image(encode(src, "PNG", transparency=0))
    assert img.mode == "P" and img.info.get("transparency") == 0
    assert img.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    img = decode_image(jpeg_orientation6((8, 4)))
    assert img.size == (4, 8)                                     # rotated: width and height swapped
    assert 0x0112 not in img.getexif()                            # and the tag no longer claims a rotation


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "MPO", "TIFF"])
def test_multi_frame_image_gives_its_first_frame(fmt):
    red, blue = Image.new("RGB", (6, 6), (255, 0, 0)), Image.new("RGB", (6, 6), (0, 0, 255))
    data = encode(red, fmt, save_all=True, append_images=[blue], duration=50, loop=0)
    with Image.open(io.BytesIO(data)) as check:
        assert check.n_frames == 2 and check.format == fmt       # the file really has two frames
    img = decode_image(data)
    r, _, b = img.convert("RGB").getpixel((3, 3))[:3]
    assert r > 200 and b < 50
    assert getattr(img, "n_frames", 1) == 1                       # a plain image, not a frame cursor


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "JPEG", "WEBP"])
def test_other_accepted_formats(fmt):
    assert decode_image(encode(Image.new("RGB", (5, 7), (1, 2, 3)), fmt)).size == (5, 7)


@pytest.mark.parametrize("data", [random.Random(0).randbytes(4096), b"hello, world\n" * 20,
                                  b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\x89PNG\r\n\x1a\n"])
def test_non_images_are_refused(data):
    with pytest.raises(MediaError, match="not an image"):
        decode_image(data)


def test_empty_data_is_refused():
    with pytest.raises(MediaError, match="empty"):
        decode_image(b"")


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "TGA", "PPM", "PSD"])
def test_unsupported_formats_are_named(fmt):
    if fmt == "PSD":  # PIL cannot write PSD: a minimal RGB header + raw image data
        data = (b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 4, 4, 8, 3) + struct.pack(">III", 0, 0, 0)
                + struct.pack(">H", 0) + b"\x80" * 48)
    else:
        data = encode(Image.new("RGB", (16, 16), (9, 9, 9)), fmt)
    with pytest.raises(MediaError, match=f"unsupported image format {fmt}"):
        decode_image(data)


def test_pixel_limit_is_checked_from_the_header():
    # 81 Mpx: under PIL's own bomb threshold, so only our check (before decoding) can refuse it
    t0 = time.perf_counter()
    with pytest.raises(MediaError, match=r"too large: 9000x9000 = 81000000 pixels"):
        decode_image(png_header(9000, 9000))
    assert time.perf_counter() - t0 < 1.0


def test_huge_canvas_is_refused_without_allocating():
    t0 = time.perf_counter()   # 10^10 pixels (30 GB of RGB) claimed by a ~100-byte file
    with pytest.raises(MediaError, match="decompression bomb|too large"):
        decode_image(png_header(100_000, 100_000))
    assert time.perf_counter() - t0 < 1.0


def test_max_pixels_argument():
    data = png("RGB", (10, 10))
    assert decode_image(data, max_pixels=100).size == (10, 10)
    with pytest.raises(MediaError, match="too large"):
        decode_image(data, max_pixels=99)


@pytest.mark.parametrize("maker", [noise_jpeg, lambda: png("RGB", (64, 64))])
def test_truncated_files_are_refused(maker):
    data = maker()
    decode_image(data)                                            # whole: fine
    with pytest.raises(MediaError, match="truncated or corrupt"):
        decode_image(data[: len(data) * 6 // 10])


def test_result_is_detached_from_the_source():
    buf = bytearray(png("RGB", (2, 2), (7, 7, 7)))
    img = decode_image(bytes(buf))
    buf[:] = b"\0" * len(buf)
    assert img.getpixel((1, 1)) == (7, 7, 7)


# ---------------------------------------------------------------------------------------- load_image

def test_load_pil_image_returns_it_with_stable_bytes():
    img = Image.new("RGB", (3, 3), (1, 2, 3))
    got, key = load_image(img, MediaPolicy())
    assert got is img and key == load_image(img.copy(), MediaPolicy())[1]
    img.putpixel((0, 0), (9, 9, 9))
    assert load_image(img, MediaPolicy())[1] != key               # pixels are part of the key
    p1 = Image.new("P", (2, 2), 0)
    p2 = p1.copy()
    p1.putpalette([255, 0, 0] * 256)
    p2.putpalette([0, 255, 0] * 256)
    assert image_bytes(p1) != image_bytes(p2)                     # the palette is too


def test_load_pil_image_respects_max_pixels():
    with pytest.raises(MediaError, match="too large"):
        load_image(Image.new("L", (10, 10)), MediaPolicy(), max_pixels=99)


def test_load_raw_bytes_and_data_url():
    data = png("RGBA", (2, 3))
    img, key = load_image(data, MediaPolicy())
    assert img.size == (2, 3) and key == data
    img, key = load_image("data:image/png;base64," + base64.b64encode(data).decode(), MediaPolicy())
    assert img.mode == "RGBA" and key == data


def test_raw_bytes_over_the_size_cap_are_refused():
    with pytest.raises(MediaError, match="too large"):
        load_image(png("RGB", (8, 8)), MediaPolicy(max_bytes=20))


def test_local_files_need_permission(tmp_path: Path):
    path = tmp_path / "pic.png"
    path.write_bytes(png("L", (4, 5)))
    for source in (path, str(path), path.as_uri()):
        with pytest.raises(MediaError, match="local files are not accepted"):
            load_image(source, MediaPolicy())
        img, key = load_image(source, MediaPolicy(allow_local_files=True))
        assert img.size == (4, 5) and key == path.read_bytes()


def test_unsupported_source_type():
    with pytest.raises(MediaError, match="unsupported image source"):
        load_image(12345, MediaPolicy())  # type: ignore[arg-type]


def test_load_image_async():
    data = png("P", (3, 3))
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    img, key = asyncio.run(load_image_async(url, MediaPolicy()))
    assert img.mode == "P" and key == data
    img, key = asyncio.run(load_image_async(data, MediaPolicy()))
    assert img.size == (3, 3)
    with pytest.raises(MediaError, match="not an image"):
        asyncio.run(load_image_async(b"nope" * 10, MediaPolicy()))


# ------------------------------------- fetch_bytes without a network: data: URLs and local files

@pytest.fixture(params=["sync", "async"])
def fetch(request) -> Callable[[str, MediaPolicy], bytes]:
    if request.param == "sync":
        return fetch_bytes
    return lambda url, policy: asyncio.run(fetch_bytes_async(url, policy))


def test_data_urls(fetch):
    b64 = base64.b64encode(SMALL_PNG).decode()
    assert fetch(f"data:image/png;base64,{b64}", MediaPolicy()) == SMALL_PNG
    assert fetch(f"data:image/png;base64,{b64.rstrip('=')}", MediaPolicy()) == SMALL_PNG  # padding optional
    assert fetch("data:text/plain,hello%20world", MediaPolicy()) == b"hello world"
    with pytest.raises(MediaError, match="invalid base64"):
        fetch("data:image/png;base64,iVBO!!!!", MediaPolicy())
    with pytest.raises(MediaError, match="no comma"):
        fetch("data:image/png;base64", MediaPolicy())
    with pytest.raises(MediaError, match="empty"):
        fetch("data:image/png;base64,", MediaPolicy())


def test_oversized_data_url_is_refused_before_decoding(fetch):
    # invalid base64 too: a decoder that ran first would report that instead of the size
    with pytest.raises(MediaError, match="too large"):
        fetch("data:image/png;base64," + "!" * 2000, MediaPolicy(max_bytes=1000))
    with pytest.raises(MediaError, match="too large"):
        fetch("data:image/png;base64," + base64.b64encode(b"x" * 1001).decode(), MediaPolicy(max_bytes=1000))
    assert len(fetch("data:;base64," + base64.b64encode(b"x" * 1000).decode(), MediaPolicy(max_bytes=1000))) == 1000


def test_local_files(fetch, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(SMALL_PNG)
    allow = MediaPolicy(allow_local_files=True)
    assert fetch(str(path), allow) == SMALL_PNG and fetch(path.as_uri(), allow) == SMALL_PNG
    with pytest.raises(MediaError, match="too large"):
        fetch(str(path), MediaPolicy(allow_local_files=True, max_bytes=len(SMALL_PNG) - 1))
    with pytest.raises(MediaError, match="not a regular file"):
        fetch(str(tmp_path), allow)
    with pytest.raises(MediaError, match="must not name a host"):
        fetch(f"file://otherhost{path}", allow)
    with pytest.raises(MediaError, match="cannot read"):
        fetch(str(tmp_path / "missing.png"), allow)
